"""The VinDr-Mammo adapter of `rsna ingest` (see VINDR_LABELS): breast-level annotations,
one row per image, a BI-RADS proxy for cancer, the findings' boxes into boxes.csv."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.sources.ingest_adapters import (BOX_COLUMNS, Read, _num, _read_table, _table,
                                                unmapped, wrong_layout)


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
