"""The CBIS-DDSM adapter of `rsna ingest` (see CBIS_LABELS): the full-mammogram subjects,
labelled by the case-description CSVs (one row per abnormality)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.sources.ingest_adapters import (ROW_COLUMNS, Read, _num, _tables, unmapped,
                                                wrong_layout)


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
