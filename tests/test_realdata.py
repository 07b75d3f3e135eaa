"""`rsna_utils.sources.realdata`: an 8-bit export (benign/, malignant/) wrapped as an RSNA-shaped DICOM set."""
import cv2
import numpy as np
import pandas as pd
import pytest

from rsna_utils.core.errors import RsnaError
from rsna_utils.dicom.reader import read_dicom
from rsna_utils.image.voi import apply_voi_lut
from rsna_utils.sources.realdata import check_wrapped, is_inverted, list_images, side_of_breast, wrap


def _breast(side: str, seed: int, h: int = 96, w: int = 64) -> np.ndarray:
    """A bright half-ellipse against the chest wall on `side`, dark background, some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    x0 = 0 if side == "L" else w - 1
    inside = ((xx - x0) / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 <= 1
    img = np.where(inside, 150 + rng.integers(0, 80, (h, w)), rng.integers(0, 6, (h, w)))
    return img.astype(np.uint8)


@pytest.fixture
def export(tmp_path):
    """8 patients, 2 images each (one side per patient), 3 of them malignant; PNG so the
    pixels are exact. Patients 3 and 6 are exported inverted (a MONOCHROME1 original shown raw:
    white background), as about 16% of the RSNA export is."""
    src = tmp_path / "export"
    truth = {}
    for p in range(8):
        folder = src / ("malignant" if p < 3 else "benign")
        folder.mkdir(parents=True, exist_ok=True)
        side = "LR"[p % 2]
        for v in range(2):
            image_id = 1000 + 10 * p + v
            img = _breast(side, image_id)
            if p in (2, 5):
                img = 255 - img
            cv2.imwrite(str(folder / f"{p + 1}_{image_id}_x.png"), img)
            truth[image_id] = (side, img)
    (src / "benign" / "notes.txt").write_text("not an image")
    return src, truth


def test_side_of_breast_reads_the_chest_wall_side():
    assert side_of_breast(_breast("L", 0)) == "L"
    assert side_of_breast(_breast("R", 0)) == "R"
    assert side_of_breast(_breast("L", 0)[:, ::-1]) == "R"
    assert side_of_breast(255 - _breast("L", 0)) == "L"          # inverted export


def test_inverted_exports_are_recognised_by_their_bright_border():
    img = _breast("L", 0)
    assert not is_inverted(img) and is_inverted(255 - img)
    assert not is_inverted(_breast("R", 3)) and is_inverted(255 - _breast("R", 3))


def test_wrap_writes_rsna_shaped_dicoms_with_a_patient_grouped_test_part(export, tmp_path):
    src, truth = export
    counts = wrap(src, tmp_path / "dcm", test_frac=0.25, seed=0, workers=1, progress=False)
    out = tmp_path / "dcm"
    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    labels = pd.read_csv(out / "test_labels.csv")
    assert len(train) + len(test) == len(truth) == counts["train_images"] + counts["test_images"]
    assert not set(train.patient_id) & set(test.patient_id)           # grouped by patient
    assert counts["test_patients"] >= 1 and counts["train_positive"] >= 1
    assert counts["monochrome1"] == 4
    assert check_wrapped(out) and not check_wrapped(tmp_path / "nothing")
    (out / "wrap.json").unlink()                  # a wrap made before the MONOCHROME1 fix
    with pytest.raises(RsnaError, match=r"dcm: wrapped by an older version .*delete it and the "
                                        r"PNG folders"):
        check_wrapped(out)
    assert "cancer" in train and "cancer" not in test
    assert set(labels.image_id) == set(test.image_id)
    sub = pd.read_csv(out / "sample_submission.csv")
    assert set(sub.prediction_id) == set(test.patient_id.astype(str) + "_" + test.laterality)
    both = pd.concat([train.assign(part="train"), test.assign(part="test")])
    for r in both.itertuples():
        side, img = truth[r.image_id]
        assert r.laterality == side, r.image_id
        d = read_dicom(out / f"{r.part}_images" / str(r.patient_id) / f"{r.image_id}.dcm")
        # 8-bit export -> 12-bit stored values, losslessly (JPEG 2000 and JPEG Lossless)
        assert np.array_equal(d.pixels, img.astype(np.uint16) * 16 + 8), r.image_id
        assert d.header.bits_stored == 12
        inverted = r.patient_id in (3, 6)
        assert d.header.photometric == ("MONOCHROME1" if inverted else "MONOCHROME2"), r.image_id
        # what the pipeline shows: every image black-background, the breast bright
        shown = apply_voi_lut(d.pixels, d.header)[0].astype(int)
        upright = 255 - img if inverted else img
        assert np.abs(shown - upright.astype(int)).max() <= 1, r.image_id
    cancer = pd.concat([train[["image_id", "cancer"]], labels[["image_id", "cancer"]]])
    assert dict(zip(cancer.image_id, cancer.cancer)) == {i: int((i - 1000) // 10 < 3) for i in truth}


def test_bad_exports_are_named_with_the_fix(tmp_path):
    with pytest.raises(RsnaError, match=r"benign: folder not found; expected .*benign and .*malignant"):
        list_images(tmp_path)
    (tmp_path / "benign").mkdir()
    (tmp_path / "malignant").mkdir()
    with pytest.raises(RsnaError, match="no .jpg/.png images"):
        list_images(tmp_path)
    cv2.imwrite(str(tmp_path / "benign" / "scan.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(RsnaError, match=r"scan\.png: name does not start with .*rename it"):
        list_images(tmp_path)


def test_an_image_listed_as_benign_and_malignant_keeps_the_malignant_label(tmp_path):
    for folder in ("benign", "malignant"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "7_70.png"), _breast("L", 1))
    df = list_images(tmp_path)
    assert len(df) == 1 and df.cancer.iloc[0] == 1
