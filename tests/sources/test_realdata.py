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


def _meta(truth: dict, **change) -> pd.DataFrame:
    """The competition's columns for the export fixture's images; the true laterality is the
    opposite of where the fixture drew the breast for patient 2 (the mass rule would miss it)."""
    rows = []
    for image_id, (side, _) in sorted(truth.items()):
        p = (image_id - 1000) // 10
        rows.append(dict(site_id=1 + p % 2, patient_id=p + 1, image_id=image_id,
                         laterality=("R" if side == "L" else "L") if p == 1 else side,
                         view=("CC", "MLO")[image_id % 2], age=50.0 + p, cancer=int(p < 3),
                         biopsy=int(p < 4), invasive=int(p < 2), BIRADS=float(p % 3), implant=0,
                         density="ABCD"[p % 4], machine_id=49 + p, difficult_negative_case=p == 4,
                         fold=p % 4))
    return pd.DataFrame(rows).assign(**change)


def test_wrap_with_the_competition_metadata_gives_true_sides_views_and_columns(export, tmp_path):
    src, truth = export
    meta = _meta(truth)
    meta_csv = tmp_path / "train_folds.csv"
    meta.to_csv(meta_csv, index=False)
    counts = wrap(src, tmp_path / "dcm", test_frac=0.25, seed=0, workers=1, progress=False,
                  meta=meta_csv)
    out = tmp_path / "dcm"
    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    both = pd.concat([train.assign(part="train"), test.assign(part="test")])
    want = meta.set_index("image_id")
    for r in both.itertuples():
        m = want.loc[r.image_id]
        assert (r.laterality, r.view, r.site_id, r.age, r.machine_id) == (
            m.laterality, m.view, m.site_id, m.age, m.machine_id), r.image_id
        h = read_dicom(out / f"{r.part}_images" / str(r.patient_id) / f"{r.image_id}.dcm").header
        assert (h.laterality, h.view) == (m.laterality, m.view)
    for c in ("BIRADS", "density", "biopsy", "invasive", "difficult_negative_case"):
        assert dict(zip(train.image_id, train[c])) == {i: want.loc[i, c] for i in train.image_id}, c
    # the same patients are held out as without the table (the split reads patient and label)
    plain = wrap(src, tmp_path / "plain", test_frac=0.25, seed=0, workers=1, progress=False)
    assert set(pd.read_csv(tmp_path / "plain" / "test.csv").image_id) == set(test.image_id)
    assert plain["metadata"] is None and counts["metadata"] == str(meta_csv)
    # patient 2's two images are drawn on the side opposite their true laterality
    assert (counts["mass_side_agrees"], counts["mass_side_checked"]) == (14, 16)
    assert counts["breasts"] == 8 and counts["breasts_with_cc_and_mlo"] == 8
    sides = pd.read_csv(out / "wrap_sides.csv")
    assert set(sides.image_id[sides.mass_side != sides.laterality]) == {1010, 1011}


def test_a_metadata_table_that_does_not_match_the_images_is_named(export, tmp_path):
    from rsna_utils.sources.realdata import join_metadata
    src, truth = export
    images = list_images(src)
    with pytest.raises(RsnaError, match=r"nope\.csv: metadata table not found"):
        join_metadata(images, tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    _meta(truth).drop(columns=["view", "density"]).to_csv(bad, index=False)
    with pytest.raises(RsnaError, match=r"bad\.csv: lacks column\(s\) \['view', 'density'\]"):
        join_metadata(images, bad)
    with pytest.raises(RsnaError, match=r"2 of 16 images have no row \(first image_id \[1070, "
                                        r"1071\].*give the table these images come from"):
        join_metadata(images, _meta(truth).query("image_id < 1070"))
    m = _meta(truth)
    m.loc[m.image_id == 1000, "cancer"] = 0
    with pytest.raises(RsnaError, match=r"1 images' cancer label differs from their folder "
                                        r"\(image_id 1000: malignant/ but cancer=0"):
        join_metadata(images, m)
    m = _meta(truth)
    m.loc[m.image_id == 1031, "patient_id"] = 99
    with pytest.raises(RsnaError, match=r"image_id 1031: 4 in its file name, 99 in the table"):
        join_metadata(images, m)
    dup = tmp_path / "dup.csv"
    pd.concat([_meta(truth), _meta(truth).head(1)]).to_csv(dup, index=False)
    with pytest.raises(RsnaError, match=r"dup\.csv: image_id 1000 has 2 rows"):
        join_metadata(images, dup)
