"""Shared fixtures: synthetic datasets (built once per session) and the real test files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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
