"""Public mammography datasets turned into the RSNA shape (`rsna ingest`).

Each adapter reads a dataset in the layout its publisher distributes and writes, in OUT:

- `train.csv`: the competition's columns and types (`core.table.TRAIN_COLUMNS`), one row per image;
  a value the source does not record is empty (as RSNA's own age, BIRADS and density can be);
- `train_images/{patient_id}/{image_id}.dcm`: a symbolic link to the source's file (a copy where
  the file system refuses links), so `rsna preprocess --images OUT/train_images --csv
  OUT/train.csv` and `learn.data.load_table` read it unchanged;
- `id_map.csv`: the source's string ids and the integers they became (kind, source_id, id);
- `unmapped.csv`: every source row or file that did not become an image, with its reason
  (`where`, `item`, `reason`, `detail`): nothing is dropped without a word;
- `ingest.json`: the format, the source folder and tables, the counts, site_id and the label
  mapping written out in words; `boxes.csv` where the source has lesion boxes (VinDr).

Ids: the source's string id (CBIS-DDSM's `P_00001`, VinDr's hex study and image ids, CMMD's
`D1-0001`) becomes `site_id * 10**12 + (sha1 of the string) mod 10**12`: the same file gets the
same id on every run and from any subset, and each source owns its own range, above every RSNA
id (< 2**31), so ingested folders and the competition's data combine without collisions.

Sites (`site_id`; RSNA's own are 1 and 2): CBIS-DDSM 101, VinDr-Mammo 102, CMMD 103. No source
records the machine as RSNA does: `machine_id` is the site_id (one "machine" per source).
`implant` is 0 (none of them records implants).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from rsna_utils.core.errors import SPACE_FIX, RsnaError, atomic_folder, writing
from rsna_utils.core.table import SOURCE_SITES, TRAIN_COLUMNS, dicom_path

INGEST_FILE = "ingest.json"
UNMAPPED_COLUMNS = ["where", "item", "reason", "detail"]
BOX_COLUMNS = ["image_id", "xmin", "ymin", "xmax", "ymax", "category", "finding_birads"]
ID_RANGE = 10**12
# what an adapter's reader returns per image, before ids and site columns are added
ROW_COLUMNS = ["patient", "image", "path", "laterality", "view", "age", "cancer", "biopsy",
               "invasive", "BIRADS", "density", "difficult_negative_case"]


@dataclass
class Read:
    """What one adapter read: images (ROW_COLUMNS; `patient` and `image` the source's string
    ids, `path` the file), unmapped rows (UNMAPPED_COLUMNS), extra tables keyed by file name
    (their `image` column holds source image ids), the tables read, notes for ingest.json."""
    images: pd.DataFrame
    unmapped: list[dict] = field(default_factory=list)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@dataclass
class Format:
    name: str
    site_id: int
    read: Callable[[Path, Path | None, bool], Read]
    layout: str                     # the expected layout, in the words of an error
    labels: dict[str, str]          # column -> the mapping in words (ingest.json)


def unmapped(where, item, reason: str, detail: str = "") -> dict:
    return dict(where=str(where), item=str(item), reason=reason, detail=detail)


def found(folder: Path, n: int = 6) -> str:
    """The first entries of `folder`, for an error that says what was there instead."""
    if not folder.is_dir():
        return "no such folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    return ", ".join(names[:n]) + (f" ... ({len(names)} entries)" if len(names) > n else "")


def wrong_layout(fmt: str, src: Path, layout: str, what: str) -> RsnaError:
    return RsnaError(f"{src}: {what}, so this is not a {fmt} folder: expected {layout}; found "
                     f"{found(src)}. Point --src at the dataset's folder (or pick its --format)")


def _num(v) -> float:
    """The number in '4', 4, 'BI-RADS 4'; NaN where there is none."""
    m = re.search(r"\d+(\.\d+)?", str(v)) if v is not None else None
    return float(m.group()) if m else float("nan")


# ----------------------------------------------------------------------------------------
# CBIS-DDSM
# ----------------------------------------------------------------------------------------

CBIS_SUBJECT = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(_\d+)?$")
CBIS_PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
CBIS_NEEDS = ("patient_id", "left or right breast", "image view", "pathology", "assessment",
              "image file path", "breast density")
CBIS_LAYOUT = ("CBIS-DDSM/<Subject like Mass-Training_P_00001_LEFT_CC>/<study>/<series>/1-1.dcm "
               "and the case-description CSVs (mass_case_description_train_set.csv, "
               "calc_case_description_test_set.csv ...) in --src or --meta")
CBIS_LABELS = {
    "cancer": "1 when any abnormality of the image has pathology MALIGNANT, 0 when all are "
              "BENIGN or BENIGN_WITHOUT_CALLBACK; an image with another pathology (and no "
              "malignant one) is unmapped. Every CBIS-DDSM lesion was verified by biopsy",
    "BIRADS": "the highest `assessment` (BI-RADS 0-5) of the image's abnormalities: the source's "
              "scale, not RSNA's 0-2 screening one",
    "density": "`breast density` 1-4 -> A-D (other values empty)",
    "biopsy": "1: CBIS-DDSM lists biopsy-proven lesions only",
    "invasive": "0 for benign images; empty for malignant ones (not recorded)",
    "difficult_negative_case": "True for benign images (biopsied, no cancer, as RSNA's flag)",
    "age": "empty (not in the case descriptions)",
    "patient_id": "from `patient_id` (P_00001); laterality and view from the subject name",
    "images": "one per full-mammogram subject; ROI / crop subjects (suffix _1, _2 ...) are "
              "unmapped; a film listed under both Mass and Calc is kept once, labels merged",
}


def _cbis_root(src: Path) -> Path:
    return src / "CBIS-DDSM" if (src / "CBIS-DDSM").is_dir() else src


def _tables(folders: list[Path], meta: Path | None, pattern: str) -> list[Path]:
    """Files matching `pattern` in --meta (a file, or a folder), else in `folders`."""
    if meta is not None:
        return [meta] if meta.is_file() else sorted(meta.glob(pattern))
    return sorted({p for d in folders for p in d.glob(pattern)})


def _read_cbis_csv(path: Path) -> pd.DataFrame:
    t = pd.read_csv(path, dtype=str, keep_default_na=False)
    # the mass CSVs spell it breast_density, the calc CSVs breast density
    t.columns = [c.strip().lower().replace("breast_density", "breast density") for c in t.columns]
    lacking = [c for c in CBIS_NEEDS if c not in t.columns]
    if lacking:
        raise RsnaError(f"{path}: lacks column(s) {lacking}; expected a CBIS-DDSM case-description "
                        f"CSV (columns {', '.join(CBIS_NEEDS)} ...)")
    t["subject"] = t["image file path"].str.strip().str.split("/").str[0]
    t["where"] = [f"{path.name} line {i + 2}" for i in range(len(t))]
    return t


def _cbis_rows(csvs: list[Path], unmapped_rows: list) -> pd.DataFrame:
    """The case-description rows with a known pathology; the others go to unmapped."""
    t = pd.concat([_read_cbis_csv(p) for p in csvs], ignore_index=True)
    t["label"] = t.pathology.str.strip().str.upper().map(CBIS_PATHOLOGY)
    for r in t[t.label.isna()].itertuples():
        unmapped_rows.append(unmapped(r.where, r.subject, "pathology not known",
                                      f"pathology {r.pathology!r}: not one of "
                                      f"{', '.join(CBIS_PATHOLOGY)}"))
    return t


def _cbis_image_labels(t: pd.DataFrame, unmapped_rows: list) -> pd.DataFrame:
    """One row per subject: cancer if any abnormality is malignant; BIRADS the highest
    assessment; density of its first row. An image with an unknown pathology and no malignant
    one has no label and is unmapped."""
    t = t.assign(assessment=t.assessment.map(_num), dens=t["breast density"].map(_num))
    g = t.groupby("subject", sort=True)
    lab = pd.DataFrame({"cancer": g.label.max(), "unknown": g.label.apply(lambda s: s.isna().any()),
                        "BIRADS": g.assessment.max(), "dens": g.dens.first(),
                        "patient": g.patient_id.first().str.strip()})
    undecided = lab.cancer.isna() | (lab.unknown & (lab.cancer != 1))
    for s in lab.index[undecided]:
        unmapped_rows.append(unmapped("case descriptions", s, "label not known",
                                      "no malignant abnormality and one of unknown pathology"))
    lab = lab[~undecided]
    lab["density"] = lab.dens.map({1.0: "A", 2.0: "B", 3.0: "C", 4.0: "D"})
    return lab.drop(columns=["unknown", "dens"])


def _cbis_files(root: Path, unmapped_rows: list) -> dict[str, Path]:
    """subject -> its DICOM, for the full-mammogram subjects; ROI / crop subjects, folders
    that are no CBIS-DDSM subject and extra files are unmapped."""
    files = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = CBIS_SUBJECT.match(d.name)
        if not m or m.group(6):
            why = ("ROI / crop subject", "a lesion's mask or cropped patch (subject suffix "
                   f"{m.group(6)}), not a full mammogram") if m else \
                ("not a CBIS-DDSM subject", "name unlike Mass-Training_P_00001_LEFT_CC")
            unmapped_rows.append(unmapped(d, d.name, *why))
            continue
        dcms = sorted(d.rglob("*.dcm"))
        if not dcms:
            unmapped_rows.append(unmapped(d, d.name, "file not found", "no .dcm under the subject"))
            continue
        files[d.name] = dcms[0]
        for extra in dcms[1:]:
            unmapped_rows.append(unmapped(extra, d.name, "extra file", f"a full-mammogram subject "
                                          f"has one film; kept {dcms[0].relative_to(d)}"))
    return files


def _cbis_merge_duplicates(img: pd.DataFrame, unmapped_rows: list) -> pd.DataFrame:
    """A film listed under both Mass and Calc (same patient, side, view) is kept once, under
    its first subject by name (Calc-... before Mass-...), with the labels merged (cancer and
    BIRADS the higher)."""
    key = ["patient", "laterality", "view"]
    img = img.sort_index()
    agg = img.groupby(key, sort=False).agg(cancer=("cancer", "max"), BIRADS=("BIRADS", "max"))
    first = ~img.duplicated(key)
    for s, r in img[~first].iterrows():
        kept = img[first & (img[key] == r[key]).all(axis=1)].index[0]
        unmapped_rows.append(unmapped("CBIS-DDSM", s, "same film", f"also listed as {kept}; "
                                      "its labels are merged into that image"))
    img = img[first].drop(columns=["cancer", "BIRADS"])
    return img.join(agg, on=key)


def read_cbis(src: Path, meta: Path | None, progress: bool) -> Read:
    """CBIS-DDSM (TCIA): the full-mammogram subjects under CBIS-DDSM/, labelled by the
    case-description CSVs (one row per abnormality). See CBIS_LABELS for the mapping."""
    root = _cbis_root(src)
    if not root.is_dir() or not any(CBIS_SUBJECT.match(p.name) for p in root.iterdir()):
        raise wrong_layout("CBIS-DDSM", src, CBIS_LAYOUT, "no subject folder like "
                           "Mass-Training_P_00001_LEFT_CC")
    csvs = _tables([src, root], meta, "*case_description*.csv")
    if not csvs:
        raise wrong_layout("CBIS-DDSM", meta or src, CBIS_LAYOUT, "no *case_description*.csv")
    lost: list[dict] = []
    rows = _cbis_rows(csvs, lost)
    lab = _cbis_image_labels(rows, lost)
    files = _cbis_files(root, lost)
    for s in sorted(set(lab.index) - set(files)):
        lost.append(unmapped("case descriptions", s, "file not found", f"no folder {root / s}"))
    for s in sorted(set(files) - set(rows.subject)):    # described but unlabelled: told above
        lost.append(unmapped(files[s], s, "no label", "no row in the case-description CSVs"))
    img = lab.loc[sorted(set(files) & set(lab.index))].copy()
    parts = img.index.to_series().str.extract(CBIS_SUBJECT)
    img["laterality"], img["view"] = parts[3].str[0], parts[4]
    img["path"] = [str(files[s]) for s in img.index]
    img = _cbis_merge_duplicates(img, lost)
    img = img.assign(image=img.index, age=np.nan, biopsy=1,
                     invasive=np.where(img.cancer == 1, np.nan, 0),
                     difficult_negative_case=img.cancer == 0).reset_index(drop=True)
    return Read(img[ROW_COLUMNS], lost, tables=[str(p) for p in csvs])


# ----------------------------------------------------------------------------------------
# VinDr-Mammo
# ----------------------------------------------------------------------------------------

VINDR_BREAST = "breast-level_annotations.csv"
VINDR_FINDINGS = "finding_annotations.csv"
VINDR_NEEDS = ("study_id", "image_id", "laterality", "view_position", "breast_birads",
               "breast_density")
VINDR_BOX_NEEDS = ("image_id", "finding_categories", "finding_birads", "xmin", "ymin", "xmax",
                   "ymax")
VINDR_LAYOUT = (f"{VINDR_BREAST} and {VINDR_FINDINGS} (in --src or --meta) and "
                "images/<study_id>/<image_id>.dicom")
VINDR_LABELS = {
    "cancer": "a proxy: 1 for breast BI-RADS 5 (highly suggestive of malignancy), 0 for "
              "BI-RADS 1-3. VinDr-Mammo has no pathology; BI-RADS 4 (suspicious: 2-95% malignant "
              "at biopsy) is neither, so its images are left out (unmapped.csv, 'BI-RADS 4')",
    "BIRADS": "breast_birads 'BI-RADS 1'..'BI-RADS 5' -> 1..5: the source's scale, not RSNA's "
              "0-2 screening one",
    "density": "breast_density 'DENSITY A'..'DENSITY D' -> A..D",
    "biopsy": "empty (not recorded)", "invasive": "empty (not recorded)",
    "difficult_negative_case": "empty (not recorded)", "age": "empty (read no header)",
    "patient_id": "from study_id (VinDr-Mammo has one study per patient)",
    "boxes": f"{VINDR_FINDINGS}'s boxes of the ingested images -> boxes.csv (original pixels; "
             "category the finding_categories joined by ';', finding_birads as the number)",
}


def _read_table(path: Path, needs: tuple, what: str) -> pd.DataFrame:
    try:
        t = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: not a readable CSV ({e}); expected {what}") from None
    lacking = [c for c in needs if c not in t.columns]
    if lacking:
        raise RsnaError(f"{path}: lacks column(s) {lacking}; expected {what} (columns "
                        f"{', '.join(needs)} ...)")
    return t


def _table(src: Path, meta: Path | None, name: str) -> Path | None:
    """`name` in --meta (a folder, or a folder holding it) or in src; None if absent."""
    for d in ([meta if meta.is_dir() else meta.parent] if meta is not None else []) + [src]:
        if (d / name).is_file():
            return d / name
    return None


def _on_disk(folder: Path) -> set[str]:
    """Every `<sub>/<file>` under folder, listed once (fast for 20,000 table rows)."""
    out = set()
    if folder.is_dir():
        for d in os.scandir(folder):
            if d.is_dir():
                out.update(f"{d.name}/{f.name}" for f in os.scandir(d.path))
    return out


def _vindr_boxes(path: Path | None) -> pd.DataFrame:
    if path is None:
        return pd.DataFrame(columns=["image", *BOX_COLUMNS[1:]])
    f = _read_table(path, VINDR_BOX_NEEDS, "VinDr-Mammo's finding annotations")
    f = f[f.xmin.str.strip() != ""]
    cat = f.finding_categories.str.findall(r"'([^']*)'").str.join(";")
    return pd.DataFrame({"image": f.image_id, **{c: pd.to_numeric(f[c]) for c in
                                                 ("xmin", "ymin", "xmax", "ymax")},
                         "category": cat, "finding_birads": f.finding_birads.map(_num)})


def read_vindr(src: Path, meta: Path | None, progress: bool) -> Read:
    """VinDr-Mammo (PhysioNet): breast-level annotations, one row per image, images at
    images/<study_id>/<image_id>.dicom. See VINDR_LABELS for the mapping."""
    table = _table(src, meta, VINDR_BREAST)
    if table is None:
        raise wrong_layout("VinDr-Mammo", src, VINDR_LAYOUT, f"no {VINDR_BREAST}")
    t = _read_table(table, VINDR_NEEDS, "VinDr-Mammo's breast-level annotations")
    if not (src / "images").is_dir():
        raise wrong_layout("VinDr-Mammo", src, VINDR_LAYOUT, "no images/ folder")
    t["where"] = [f"{table.name} line {i + 2}" for i in range(len(t))]
    t["file"] = t.study_id + "/" + t.image_id + ".dicom"
    t["BIRADS"] = t.breast_birads.map(_num)
    t["density"] = t.breast_density.str.extract(r"^DENSITY ([A-D])$", expand=False)
    lost = []
    bad = [(~t.file.isin(_on_disk(src / "images")), "file not found",
            "no " + str(src / "images") + "/" + t.file),
           (~t.BIRADS.between(1, 5), "BI-RADS not known", "breast_birads " + t.breast_birads),
           (t.BIRADS == 4, "BI-RADS 4: suspicious, not known cancer-free; left out",
            "breast_birads " + t.breast_birads),
           (~t.laterality.isin(["L", "R"]), "laterality not known", "laterality " + t.laterality)]
    ok = pd.Series(True, index=t.index)
    for mask, reason, detail in bad:
        mask = mask & ok
        lost += [unmapped(w, i, reason, d) for w, i, d in
                 zip(t["where"][mask], t.image_id[mask], detail[mask])]
        ok &= ~mask
    t = t[ok]
    img = pd.DataFrame({"patient": t.study_id, "image": t.image_id,
                        "path": [str(src / "images" / f) for f in t.file],
                        "laterality": t.laterality, "view": t.view_position.str.strip(),
                        "age": np.nan, "cancer": (t.BIRADS == 5).astype(int), "biopsy": np.nan,
                        "invasive": np.nan, "BIRADS": t.BIRADS, "density": t.density,
                        "difficult_negative_case": np.nan})
    boxes_at = _table(src, meta, VINDR_FINDINGS)
    boxes = _vindr_boxes(boxes_at)
    notes = {"split": t.split.value_counts().to_dict()} if "split" in t else {}
    if boxes_at is None:
        notes["boxes"] = f"none: no {VINDR_FINDINGS} found"
    return Read(img.reset_index(drop=True), lost,
                extra={"boxes.csv": boxes[boxes.image.isin(set(img.image))]},
                tables=[str(p) for p in (table, boxes_at) if p is not None], notes=notes)


# ----------------------------------------------------------------------------------------
# CMMD
# ----------------------------------------------------------------------------------------

CMMD_ID = re.compile(r"^D\d-\d{4}$")
CMMD_NEEDS = ("ID1", "LeftRight", "Age", "classification")
CMMD_TABLE = "CMMD_clinicaldata_revision"
CMMD_LAYOUT = ("CMMD/<ID1 like D1-0001>/<study>/<series>/1-1.dcm and the clinical table "
               f"{CMMD_TABLE}.csv (or .xlsx) in --src or --meta")
CMMD_VIEWS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML",
              "latero-medial": "LM", "cranio-caudal exaggerated laterally": "XCCL"}
CMMD_LABELS = {
    "cancer": "1 for classification Malignant, 0 for Benign (per breast, from the clinical "
              "table; other values are unmapped). CMMD's lesions were confirmed by biopsy",
    "biopsy": "1: every CMMD lesion was biopsied",
    "invasive": "0 for benign breasts; empty for malignant ones (not recorded)",
    "difficult_negative_case": "True for benign breasts (biopsied, no cancer, as RSNA's flag)",
    "age": "Age of the clinical table",
    "BIRADS": "empty (not recorded)", "density": "empty (not recorded)",
    "laterality": "ImageLaterality of each DICOM header",
    "view": "ViewPosition, else the CodeMeaning of ViewCodeSequence (cranio-caudal -> CC, "
            "medio-lateral oblique -> MLO)",
    "patient_id": "from ID1 (D1-0001); the breast's row is found by ID1 and LeftRight",
    "image_id": "from the SOPInstanceUID (else the file's path under CMMD/)",
}


def _cmmd_table(src: Path, meta: Path | None) -> Path:
    if meta is not None and meta.is_file():
        return meta
    for d in ([meta] if meta is not None else []) + [src, _cmmd_root(src)]:
        for ext in (".csv", ".xlsx"):
            if (d / f"{CMMD_TABLE}{ext}").is_file():
                return d / f"{CMMD_TABLE}{ext}"
    raise wrong_layout("CMMD", meta or src, CMMD_LAYOUT, f"no {CMMD_TABLE}.csv or .xlsx")


def _read_cmmd_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            raise RsnaError(f"{path}: reading .xlsx needs openpyxl, which is not installed; "
                            f"export the sheet as CSV ({path.with_suffix('.csv').name} beside "
                            "it) or `pip install openpyxl`") from None
        t = pd.read_excel(path, dtype=str).fillna("")
        lacking = [c for c in CMMD_NEEDS if c not in t.columns]
        if lacking:
            raise RsnaError(f"{path}: lacks column(s) {lacking}; expected CMMD's clinical table")
    else:
        t = _read_table(path, CMMD_NEEDS, "CMMD's clinical table")
    t["where"] = [f"{path.name} line {i + 2}" for i in range(len(t))]
    t["side"] = t.LeftRight.str.strip().str.upper()
    t["label"] = t.classification.str.strip().str.lower().map({"malignant": 1, "benign": 0})
    return t


def _cmmd_root(src: Path) -> Path:
    return src / "CMMD" if (src / "CMMD").is_dir() else src


def _view(ds) -> str | None:
    vp = str(ds.get("ViewPosition") or "").strip().upper()
    if vp:
        return vp
    for item in ds.get("ViewCodeSequence") or []:
        return CMMD_VIEWS.get(str(item.get("CodeMeaning", "")).strip().lower())
    return None


def _cmmd_header(path: Path) -> dict | str:
    """laterality, view and SOPInstanceUID from one DICOM's header; a string says what is
    wrong with it."""
    from rsna_utils.dicom.header import read_header
    try:
        h = read_header(path)
    except RsnaError as e:
        return str(e)
    lat = str(h.laterality or "").strip().upper()
    view = _view(h.dataset)
    if lat not in ("L", "R"):
        return f"ImageLaterality {h.laterality!r}: not L or R" if lat else "no ImageLaterality"
    if view is None:
        return "no ViewPosition, nor a known CodeMeaning in ViewCodeSequence"
    return dict(side=lat, view=view, uid=str(h.dataset.get("SOPInstanceUID") or ""))


def _cmmd_files(root: Path, progress: bool, lost: list) -> pd.DataFrame:
    """One row per DICOM of a patient folder: ID1, path, image (the SOPInstanceUID, which a
    re-download keeps, else the path under CMMD/), laterality and view from the header."""
    from tqdm.auto import tqdm
    files = [(d.name, f) for d in sorted(root.iterdir()) if d.is_dir() and CMMD_ID.match(d.name)
             for f in sorted(d.rglob("*.dcm"))]
    rows = []
    for pid, f in tqdm(files, desc="ingest cmmd headers", unit="img", disable=not progress,
                       file=sys.stderr):
        h = _cmmd_header(f)
        if isinstance(h, str):
            lost.append(unmapped(f, f.relative_to(root), "header not usable", h))
        else:
            rows.append(dict(ID1=pid, path=str(f), image=h["uid"] or str(f.relative_to(root)),
                             side=h["side"], view=h["view"]))
    return pd.DataFrame(rows, columns=["ID1", "path", "image", "side", "view"])


def _cmmd_breasts(t: pd.DataFrame, lost: list) -> pd.DataFrame:
    """One row per (ID1, side) with a known classification; unknown ones and breasts listed
    twice with different classifications are unmapped."""
    for r in t[t.label.isna()].itertuples():
        lost.append(unmapped(r.where, f"{r.ID1} {r.side}", "classification not known",
                             f"classification {r.classification!r}: not Benign or Malignant"))
    t = t[t.label.notna()]
    clash = t.groupby(["ID1", "side"]).label.transform("nunique") > 1
    for r in t[clash].itertuples():
        lost.append(unmapped(r.where, f"{r.ID1} {r.side}", "conflicting rows",
                             "the breast has a Benign and a Malignant row"))
    return t[~clash].drop_duplicates(["ID1", "side"])


def read_cmmd(src: Path, meta: Path | None, progress: bool) -> Read:
    """The Chinese Mammography Database (TCIA): patient folders under CMMD/, one clinical-table
    row per breast; laterality and view read from every DICOM header. See CMMD_LABELS."""
    root = _cmmd_root(src)
    if not root.is_dir() or not any(CMMD_ID.match(p.name) for p in root.iterdir()):
        raise wrong_layout("CMMD", src, CMMD_LAYOUT, "no patient folder like D1-0001")
    table = _cmmd_table(src, meta)
    lost: list[dict] = []
    breasts = _cmmd_breasts(_read_cmmd_table(table), lost)
    files = _cmmd_files(root, progress, lost)
    j = files.merge(breasts, on=["ID1", "side"], how="outer", indicator=True)
    for r in j[j._merge == "right_only"].itertuples():
        lost.append(unmapped(r.where, f"{r.ID1} {r.side}", "file not found",
                             f"no DICOM of this breast under {root / r.ID1}"))
    for r in j[j._merge == "left_only"].itertuples():
        lost.append(unmapped(r.path, Path(r.path).relative_to(root), "no label",
                             f"no row for {r.ID1} side {r.side} in {table.name}"))
    j = j[j._merge == "both"]
    img = pd.DataFrame({"patient": j.ID1, "image": j.image, "path": j.path, "laterality": j.side,
                        "view": j.view, "age": pd.to_numeric(j.Age, errors="coerce"),
                        "cancer": j.label.astype(int), "biopsy": 1,
                        "invasive": np.where(j.label == 1, np.nan, 0), "BIRADS": np.nan,
                        "density": np.nan, "difficult_negative_case": j.label == 0})
    return Read(img.reset_index(drop=True), lost, tables=[str(table)])


FORMATS = {f.name: f for f in (
    Format("cbis-ddsm", SOURCE_SITES["cbis-ddsm"][0], read_cbis, CBIS_LAYOUT, CBIS_LABELS),
    Format("vindr", SOURCE_SITES["vindr"][0], read_vindr, VINDR_LAYOUT, VINDR_LABELS),
    Format("cmmd", SOURCE_SITES["cmmd"][0], read_cmmd, CMMD_LAYOUT, CMMD_LABELS),
)}


# ----------------------------------------------------------------------------------------
# Shared: ids, the table, links, the output folder
# ----------------------------------------------------------------------------------------

def stable_ids(texts: pd.Series, site_id: int, kind: str, fmt: str) -> pd.Series:
    """site_id * 10**12 + sha1(format:kind:text) mod 10**12, as int64. Two texts that meet
    on one id (about 1 in 10**5 for 20,000 images) are an error rather than one image."""
    def one(s: str) -> int:
        return int(hashlib.sha1(f"{fmt}:{kind}:{s}".encode()).hexdigest(), 16) % ID_RANGE
    uniq = pd.unique(texts)
    ids = pd.Series([site_id * ID_RANGE + one(str(s)) for s in uniq], index=uniq, dtype="int64")
    clash = ids[ids.duplicated(keep=False)]
    if len(clash):
        raise RsnaError(f"{kind} ids {list(clash.index[:2])} hash to the same id {clash.iloc[0]}; "
                        "report it: the id scheme (rsna_utils/sources/ingest.py) needs a wider "
                        "range")
    return texts.map(ids).astype("int64")


def rsna_table(r: Read, fmt: Format) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train.csv's rows with a `path` column, id_map) from an adapter's images."""
    d = r.images.copy()
    d["patient_id"] = stable_ids(d.patient, fmt.site_id, "patient", fmt.name)
    d["image_id"] = stable_ids(d.image, fmt.site_id, "image", fmt.name)
    d["site_id"] = d["machine_id"] = fmt.site_id
    d["implant"] = 0
    d = d.astype({"age": "float64", "cancer": "int64", "biopsy": "Int64", "invasive": "Int64",
                  "BIRADS": "float64", "difficult_negative_case": "boolean"})
    d = d.sort_values(["patient_id", "laterality", "view", "image_id"]).reset_index(drop=True)
    id_map = pd.concat([
        pd.DataFrame({"kind": "patient", "source_id": d.patient, "id": d.patient_id}),
        pd.DataFrame({"kind": "image", "source_id": d.image, "id": d.image_id})]
    ).drop_duplicates()
    return d[[*TRAIN_COLUMNS, "path"]], id_map


def link(src: str | Path, dst: Path) -> str:
    """dst -> src as a symbolic link ("symlink"), else a copy ("copy")."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.realpath(src), dst)
        return "symlink"
    except OSError:
        with writing(dst, "copying an image", SPACE_FIX):
            shutil.copyfile(src, dst)
        return "copy"


def link_images(table: pd.DataFrame, out: Path, progress: bool, desc: str) -> dict:
    """train_images/{patient_id}/{image_id}.dcm for every row; the counts by kind of link."""
    from tqdm.auto import tqdm
    kinds = {"symlink": 0, "copy": 0}
    rows = zip(table.path, table.patient_id, table.image_id)
    for path, pid, iid in tqdm(rows, total=len(table), desc=desc, unit="img",
                               disable=not progress, file=sys.stderr):
        kinds[link(path, dicom_path(out / "train_images", pid, iid))] += 1
    return kinds


def check_out(out: Path) -> None:
    """OUT is replaced whole: refused when it holds anything `rsna ingest` did not make."""
    if out.is_dir() and any(out.iterdir()) and not (out / INGEST_FILE).is_file():
        raise RsnaError(f"{out}: not empty and not made by `rsna ingest` (no {INGEST_FILE}); "
                        "give --out a new or empty folder (an earlier ingest's is replaced)")
    if out.exists() and not out.is_dir():
        raise RsnaError(f"{out}: a file, not a folder; give --out a folder")


def counts(table: pd.DataFrame, lost: pd.DataFrame) -> dict:
    breasts = table.groupby(["patient_id", "laterality"]).cancer.max()
    return dict(images=len(table), patients=int(table.patient_id.nunique()),
                positive_images=int(table.cancer.sum()), breasts=len(breasts),
                positive_breasts=int(breasts.sum()), unmapped=len(lost),
                unmapped_by_reason={k: int(v) for k, v in lost.reason.value_counts().items()})


def write_folder(tmp: Path, table: pd.DataFrame, lost: list[dict], info: dict,
                 extra: dict[str, pd.DataFrame], progress: bool, desc: str) -> dict:
    """Links, train.csv, unmapped.csv, the extra tables and ingest.json into `tmp`."""
    lost_df = pd.DataFrame(lost, columns=UNMAPPED_COLUMNS)
    info = {**info, **counts(table, lost_df),
            "links": link_images(table, tmp, progress, desc)}
    table.drop(columns="path").to_csv(tmp / "train.csv", index=False)
    lost_df.to_csv(tmp / "unmapped.csv", index=False)
    for name, df in extra.items():
        df.to_csv(tmp / name, index=False)
    (tmp / INGEST_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def ingest(fmt: str, src: str | Path, out: str | Path, meta: str | Path | None = None,
           progress: bool = True) -> dict:
    """Read the dataset at `src` in format `fmt` (FORMATS) and write the RSNA-shaped folder
    `out` (replaced whole; see the module's docstring). `meta`: where the source's tables are
    when not in `src` (a file or a folder). Returns what ingest.json holds."""
    if fmt not in FORMATS:
        raise RsnaError(f"--format {fmt!r}: not known; choose {', '.join(FORMATS)}")
    f, src, out = FORMATS[fmt], Path(src), Path(out)
    if not src.is_dir():
        raise RsnaError(f"{src}: folder not found; point --src at the {fmt} dataset ({f.layout})")
    check_out(out)
    r = f.read(src, Path(meta) if meta is not None else None, progress)
    if r.images.empty:
        raise RsnaError(f"{src}: no image could be mapped ({len(r.unmapped)} unmapped, e.g. "
                        f"{r.unmapped[0]['item'] if r.unmapped else '-'}: "
                        f"{r.unmapped[0]['reason'] if r.unmapped else '-'}); expected {f.layout}")
    twice = r.images.image.duplicated()
    r.unmapped += [unmapped(p, i, "listed twice", "the same image id on another row; kept the "
                            "first") for p, i in zip(r.images.path[twice], r.images.image[twice])]
    r.images = r.images[~twice]
    table, id_map = rsna_table(r, f)
    extra = {"id_map.csv": id_map, **{k: _with_ids(v, id_map) for k, v in r.extra.items()}}
    info = dict(format=fmt, source=str(src.resolve()), tables=r.tables, site_id=f.site_id,
                labels=f.labels, ids="site_id * 10**12 + sha1(format:kind:source id) mod 10**12 "
                "(id_map.csv)", **r.notes)
    with atomic_folder(out) as tmp:
        info = write_folder(tmp, table, r.unmapped, info, extra, progress, f"ingest {fmt}")
    return {**info, "out": str(out)}


def _with_ids(df: pd.DataFrame, id_map: pd.DataFrame) -> pd.DataFrame:
    """An extra table's source `image` ids replaced by the ingested image_id."""
    ids = id_map[id_map.kind == "image"].set_index("source_id").id
    return df.assign(image=df.image.map(ids).astype("int64")).rename(columns={"image": "image_id"})


# ----------------------------------------------------------------------------------------
# Combining ingested (or RSNA-shaped) folders
# ----------------------------------------------------------------------------------------

def _read_part(part: Path) -> pd.DataFrame:
    csv = part / "train.csv"
    if not csv.is_file():
        raise RsnaError(f"{csv}: not found; each folder to combine needs train.csv and "
                        "train_images/ (an `rsna ingest` output or an RSNA-shaped dataset)")
    t = pd.read_csv(csv)
    lacking = [c for c in TRAIN_COLUMNS if c not in t.columns]
    if lacking:
        raise RsnaError(f"{csv}: lacks column(s) {lacking}; expected the competition's train.csv "
                        "columns")
    t = t[TRAIN_COLUMNS].assign(part=str(part))
    t["path"] = [str(dicom_path(part / "train_images", p, i))
                 for p, i in zip(t.patient_id, t.image_id)]
    return t


def _refuse_collisions(tables: list[pd.DataFrame]) -> None:
    """An image_id or a patient_id in two folders is refused, naming both and the id."""
    for col in ("image_id", "patient_id"):
        owner: dict = {}
        for t in tables:
            for v in pd.unique(t[col]):
                if v in owner:
                    raise RsnaError(f"{t.part.iloc[0]}/train.csv: {col} {v} is also in "
                                    f"{owner[v]}/train.csv; ids must be unique across the "
                                    "combined folders: leave one out or re-ingest it")
            owner.update(dict.fromkeys(pd.unique(t[col]), t.part.iloc[0]))


def _concat_extra(parts: list[Path], name: str) -> pd.DataFrame | None:
    found_ = [pd.read_csv(p / name).assign(part=str(p)) for p in parts if (p / name).is_file()]
    return pd.concat(found_, ignore_index=True) if found_ else None


def combine(out: str | Path, parts: list[str | Path], progress: bool = True) -> dict:
    """One RSNA-shaped folder (train.csv, train_images links) from several ingested or
    RSNA-shaped folders. Colliding image_ids or patient_ids are refused; an image listed but
    absent is unmapped. boxes.csv, id_map.csv and unmapped.csv of the parts are concatenated
    (with a `part` column)."""
    out, parts = Path(out), [Path(p) for p in parts]
    if len(parts) < 2:
        raise RsnaError("--combine: give two or more folders to combine")
    if len({p.resolve() for p in parts}) < len(parts):
        raise RsnaError(f"--combine {' '.join(map(str, parts))}: a folder is given twice")
    check_out(out)
    tables = [_read_part(p) for p in parts]
    _refuse_collisions(tables)
    t = pd.concat(tables, ignore_index=True)
    here = np.array([os.path.exists(p) for p in t.path], dtype=bool)
    lost = [unmapped(r.part, r.image_id, "file not found", f"no {r.path}")
            for r in t[~here].itertuples()]
    extra = {n: df for n in ("boxes.csv", "id_map.csv", "unmapped.csv")
             if (df := _concat_extra(parts, n)) is not None}
    if "unmapped.csv" in extra:     # the parts' own unmapped rows, and this step's
        earlier = extra.pop("unmapped.csv").fillna("")
        earlier["where"] = earlier.part + ": " + earlier["where"].astype(str)
        lost = earlier[UNMAPPED_COLUMNS].to_dict("records") + lost
    info = dict(format="combined", parts=[str(p.resolve()) for p in parts],
                site_ids=sorted(int(s) for s in t.site_id.unique()))
    with atomic_folder(out) as tmp:
        info = write_folder(tmp, t[here].drop(columns="part"), lost, info, extra, progress,
                            "combine")
    return {**info, "out": str(out)}
