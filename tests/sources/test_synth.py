import subprocess
import sys
from pathlib import Path

import dicomsdl
import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna_utils.sources import synth

KAGGLE_TRAIN_DTYPES = {
    "site_id": "int64", "patient_id": "int64", "image_id": "int64", "laterality": "str",
    "view": "str", "age": "float64", "cancer": "int64", "biopsy": "int64", "invasive": "int64",
    "BIRADS": "float64", "implant": "int64", "density": "str", "machine_id": "int64",
    "difficult_negative_case": "bool",
}
KAGGLE_TEST_DTYPES = {
    "site_id": "int64", "patient_id": "int64", "image_id": "int64", "laterality": "str",
    "view": "str", "age": "float64", "implant": "int64", "machine_id": "int64",
    "prediction_id": "str",
}


def _kind(dtype) -> str:
    if pd.api.types.is_string_dtype(dtype) or dtype == object:
        return "str"
    return str(dtype)


def test_csv_columns_and_dtypes(synth200):
    train = pd.read_csv(synth200 / "train.csv")
    test = pd.read_csv(synth200 / "test.csv")
    sub = pd.read_csv(synth200 / "sample_submission.csv")
    assert list(train.columns) == list(KAGGLE_TRAIN_DTYPES)
    assert list(test.columns) == list(KAGGLE_TEST_DTYPES)
    assert list(sub.columns) == ["prediction_id", "cancer"]
    assert {c: _kind(t) for c, t in train.dtypes.items()} == KAGGLE_TRAIN_DTYPES
    assert {c: _kind(t) for c, t in test.dtypes.items()} == KAGGLE_TEST_DTYPES
    assert train["laterality"].isin(["L", "R"]).all()
    assert set(train["density"].dropna()) <= set("ABCD")
    # the real missing-value pattern: site 2 has no density, BIRADS missing on many
    assert train.loc[train.site_id == 2, "density"].isna().all()
    assert 0.2 < train["BIRADS"].isna().mean() < 0.8
    assert (test["prediction_id"] == test.patient_id.astype(str) + "_" + test.laterality).all()
    assert list(sub["prediction_id"]) == list(test["prediction_id"].drop_duplicates())
    assert not set(train.patient_id) & set(test.patient_id)
    assert set(test.machine_id) - set(train.machine_id), "test should hold unseen machines"


def test_mix_lands_in_range(synth200):
    train = pd.read_csv(synth200 / "train.csv")
    n_pat = train.patient_id.nunique()
    assert n_pat == 200
    assert 3.9 <= len(train) / n_pat <= 4.4
    assert (train.groupby("patient_id").size() > 4).any(), "a few patients have an extra view"
    # positives: ~2% of breasts, both views of a positive breast positive
    breast = train.groupby(["patient_id", "laterality"]).cancer.agg(["min", "max"])
    assert (breast["min"] == breast["max"]).all()
    assert 0.002 <= breast["max"].mean() <= 0.04
    for col, lo, hi in (("view", "CC", "MLO"), ("laterality", "L", "R")):
        share = train[col].value_counts(normalize=True)
        assert 0.4 < share[lo] < 0.55 and 0.4 < share[hi] < 0.55
    headers = [pydicom.dcmread(p, stop_before_pixels=True)
               for p in sorted((synth200 / "train_images").glob("*/*.dcm"))]
    assert len(headers) == len(train)
    ts = pd.Series([str(h.file_meta.TransferSyntaxUID) for h in headers]).value_counts(normalize=True)
    assert 0.38 < ts[synth.JPEG2000_LOSSLESS] < 0.56
    assert 0.38 < ts[synth.JPEG_LOSSLESS_SV1] < 0.56
    assert 0.02 < ts.get(synth.EXPLICIT_VR_LE, 0) + ts.get(synth.RLE_LOSSLESS, 0) < 0.15
    sigmoid = np.mean([h.get("VOILUTFunction") == "SIGMOID" for h in headers])
    mono1 = np.mean([h.PhotometricInterpretation == "MONOCHROME1" for h in headers])
    assert 0.12 < sigmoid < 0.32
    assert 0.05 < mono1 < 0.35
    assert any(h.BitsStored == 16 for h in headers) and np.mean([h.BitsStored == 12 for h in headers]) > 0.9
    assert any("Modality" not in h for h in headers) and any("Modality" in h for h in headers)
    assert any("PixelPaddingValue" in h for h in headers) and any("PixelPaddingValue" not in h for h in headers)
    assert any(isinstance(h.WindowCenter, pydicom.multival.MultiValue) for h in headers)
    by_id = {int(h.SOPInstanceUID != "") and int(p.stem): h for p, h in
             zip(sorted((synth200 / "train_images").glob("*/*.dcm")), headers)}
    for r in train.itertuples():
        h = by_id[r.image_id]
        assert h.ImageLaterality == r.laterality and h.ViewPosition == r.view
        assert h.PatientID == str(r.patient_id)


def test_jpeg2000_mostly_in_jp2_container(synth200):
    starts = []
    for p in sorted((synth200 / "train_images").glob("*/*.dcm")):
        ds = pydicom.dcmread(p)
        if ds.file_meta.TransferSyntaxUID == synth.JPEG2000_LOSSLESS:
            frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
            starts.append(frame[:8])
    jp2 = sum(s == b"\x00\x00\x00\x0cjP  " for s in starts)
    raw = sum(s[:4] == b"\xff\x4f\xff\x51" for s in starts)
    assert jp2 + raw == len(starts)
    assert jp2 > 0.75 * len(starts) and raw >= 1


def test_every_file_decodes_bit_exactly_with_two_decoders(synth200):
    train = pd.read_csv(synth200 / "train.csv")
    test = pd.read_csv(synth200 / "test.csv")
    train_rows, test_rows = synth.plan_dataset(200, 7, 0.02, 40)
    rows = train_rows + test_rows
    assert [r["image_id"] for r in rows] == list(train.image_id) + list(test.image_id)
    for index, r in enumerate(rows):
        split = "train" if index < len(train_rows) else "test"
        path = synth200 / f"{split}_images" / str(r["patient_id"]) / f"{r['image_id']}.dcm"
        a = pydicom.dcmread(path).pixel_array
        b = dicomsdl.open(str(path)).pixelData(storedvalue=True)
        assert a.dtype == np.uint16 and b.dtype == np.uint16
        assert np.array_equal(a, b), path
        if index % 10 == 0:  # the stored values are what the generator meant
            expected, _, _ = synth.make_image(r, "small", 7, index)
            assert np.array_equal(a, expected), path


@pytest.mark.heavy
def test_same_seed_same_files_other_seed_differs(tmp_path):
    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    synth.synthesize(tmp_path / "a", patients=6, seed=11, workers=1, progress=False)
    synth.synthesize(tmp_path / "b", patients=6, seed=11, workers=2, progress=False)
    synth.synthesize(tmp_path / "c", patients=6, seed=12, workers=1, progress=False)
    fa, fb, fc = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert fa[Path("train.csv")] != fc[Path("train.csv")]


def test_positive_breasts_carry_a_lesion_in_each_view(synth_small):
    train = pd.read_csv(synth_small / "train.csv")
    les = pd.read_csv(synth_small / "lesions.csv")
    malignant = set(les.loc[les.kind.isin(["mass", "calc"]), "image_id"])
    pos = set(train.loc[train.cancer == 1, "image_id"])
    assert pos and malignant <= pos | set(pd.read_csv(synth_small / "test.csv").image_id)
    assert len(pos & malignant) >= 0.9 * len(pos)


@pytest.mark.parametrize("args, expect", [
    (["--patients", "-3"], "patients=-3: give an integer >= 1"),
    (["--positive-rate", "1.5"], "positive_rate=1.5: give a number in [0, 1]"),
    (["--patients", "2", "--out", "{file}/sub"], "cannot write to output folder"),
])
def test_cli_bad_arguments_give_one_line(tmp_path, args, expect):
    f = tmp_path / "afile"
    f.write_text("x")
    args = [a.replace("{file}", str(f)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "synth", "--quiet", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.heavy
def test_the_window_follows_the_tissue_not_the_lesion():
    """The DICOM window must not give the label away. It was computed over the whole breast,
    lesions included: a bright mass widened it and darkened the whole displayed image, so the
    median brightness alone told cancer from normal (image AUC 0.80-0.84 on a 150-patient set)
    and a model could score without finding a lesion. Computed from the tissue, the displayed
    median carries no label (0.44-0.59 over seeds 0, 1, 2, 3, 5, 7, 11; this seed 0.53; the
    old generator 0.15 here)."""
    from sklearn.metrics import roc_auc_score
    rows, _ = synth.plan_dataset(60, 3, 0.5, 0)
    medians, labels = [], []
    for i, r in enumerate(rows):
        stored, _, ds = synth.make_image(r, "small", 3, i)
        c, w = (float(x[0]) if isinstance(x, pydicom.multival.MultiValue) else float(x)
                for x in (ds.WindowCenter, ds.WindowWidth))
        v = stored * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        shown = np.clip((v - (c - w / 2)) / w, 0, 1)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            shown = 1 - shown
        medians.append(np.median(shown[shown > 0.1]))
        labels.append(r["cancer"])
    assert 20 <= sum(labels) <= len(labels) - 20
    auc = roc_auc_score(labels, medians)
    assert 0.35 < auc < 0.65, auc
