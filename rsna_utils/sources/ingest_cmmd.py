"""The CMMD adapter of `rsna ingest` (see CMMD_LABELS): patient folders, one clinical-table
row per breast, laterality and view read from every DICOM header."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.sources.ingest_adapters import Read, _read_table, unmapped, wrong_layout


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
