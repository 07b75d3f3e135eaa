"""Real mammograms exported as 8-bit JPEG / PNG (e.g. the public RSNA export in
`../shared/realdata/rsna_dev`, `{patient_id}_{image_id}_*.jpg` under `benign/` and
`malignant/`) wrapped as an RSNA-shaped dataset: 12-bit DICOMs (JPEG 2000 in JP2 and JPEG
Lossless SV1, the generator's encoders), `train.csv` / `test.csv` / `test_labels.csv` with a
patient-grouped held-out test part. Then every step runs through the same commands a user runs.

The export has no laterality or view. Given the competition's metadata table (`train.csv` of
the competition, e.g. `../shared/realdata/rsna_meta/train_folds.csv`; `join_metadata`), every
image gets its true laterality and view in its DICOM header and the CSVs, and its site, age,
machine, BIRADS, density, biopsy, invasive and difficult-negative flags in train.csv, so breast
pairing, auxiliary targets and per-site evaluation run as on the competition data. Without it the
side is read from the image (where the breast's mass lies) and the view is "UNK". About 16% of the RSNA export's images are
inverted (bright background, dense tissue dark): their originals were MONOCHROME1 and the export
wrote the stored values without applying it. Those are wrapped as MONOCHROME1 again, so the
pipeline's photometric handling shows every image black-background, as it does for the
competition's DICOMs."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import (SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS, dicom_path,
                                     holdout_split, prediction_id)

NAME = re.compile(r"^(\d+)_(\d+)")
# 2: inverted exports wrapped as MONOCHROME1 (1 wrapped them as they were, bright background)
# 3: the competition's metadata joined when given (true laterality, view, site, age...)
WRAP_VERSION = 3
WRAP_FILE = "wrap.json"


def list_images(src: str | Path) -> pd.DataFrame:
    """One row per image file under src/benign and src/malignant: path, patient_id, image_id,
    cancer. A name without the `{patient_id}_{image_id}` prefix is an error naming it."""
    src = Path(src)
    rows = []
    for label, folder in ((0, "benign"), (1, "malignant")):
        d = src / folder
        if not d.is_dir():
            raise RsnaError(f"{d}: folder not found; expected {src}/benign and {src}/malignant")
        for p in sorted(d.iterdir()):
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            m = NAME.match(p.name)
            if not m:
                raise RsnaError(f"{p}: name does not start with {{patient_id}}_{{image_id}}; rename it")
            rows.append(dict(path=str(p), patient_id=int(m.group(1)), image_id=int(m.group(2)), cancer=label))
    if not rows:
        raise RsnaError(f"{src}: no .jpg/.png images under benign/ and malignant/")
    df = pd.DataFrame(rows)
    dup = df[df.image_id.duplicated(keep=False)]
    if len(dup):   # an image listed twice keeps its malignant label (labels are per breast)
        df = df.sort_values("cancer").drop_duplicates("image_id", keep="last")
    return df.sort_values(["patient_id", "image_id"]).reset_index(drop=True)


def read_metadata(meta: str | Path) -> pd.DataFrame:
    """The competition's train.csv (or a table with its columns); an error names the file and
    what is missing."""
    meta = Path(meta)
    if not meta.is_file():
        raise RsnaError(f"{meta}: metadata table not found; give the competition's train.csv "
                        "(e.g. ../shared/realdata/rsna_meta/train_folds.csv)")
    table = pd.read_csv(meta)
    missing = [c for c in TRAIN_COLUMNS if c not in table.columns]   # `fold` is optional
    if missing:
        raise RsnaError(f"{meta}: lacks column(s) {missing}; give the competition's train.csv "
                        f"(columns {', '.join(TRAIN_COLUMNS)})")
    dup = table.image_id[table.image_id.duplicated()]
    if len(dup):
        raise RsnaError(f"{meta}: image_id {int(dup.iloc[0])} has {int((table.image_id == dup.iloc[0]).sum())} "
                        "rows; one row per image is expected")
    return table


def join_metadata(images: pd.DataFrame, meta: str | Path | pd.DataFrame,
                  where: str = "metadata") -> pd.DataFrame:
    """images (list_images) with the table's row of each image (joined on image_id). Refused,
    with the first ids named: an image the table lacks, a patient_id that differs, a cancer label
    that differs from the image's folder (benign/ or malignant/)."""
    table = read_metadata(meta) if not isinstance(meta, pd.DataFrame) else meta
    where = str(meta) if not isinstance(meta, pd.DataFrame) else where
    cols = [c for c in TRAIN_COLUMNS if c not in ("patient_id", "cancer")]
    j = images.merge(table[[*cols, "patient_id", "cancer"]].rename(
        columns={"patient_id": "meta_patient_id", "cancer": "meta_cancer"}), on="image_id", how="left",
        indicator=True)
    lacking = j[j._merge == "left_only"]
    if len(lacking):
        raise RsnaError(f"{where}: {len(lacking)} of {len(j)} images have no row (first image_id "
                        f"{lacking.image_id.iloc[:3].tolist()}, e.g. {lacking.path.iloc[0]}); give "
                        "the table these images come from, or leave them out of the folder")
    other = j[j.patient_id != j.meta_patient_id]
    if len(other):
        r = other.iloc[0]
        raise RsnaError(f"{where}: {len(other)} images belong to another patient there (image_id "
                        f"{r.image_id}: {r.patient_id} in its file name, {r.meta_patient_id} in the "
                        "table); the table does not describe these images")
    conflict = j[j.cancer != j.meta_cancer]
    if len(conflict):
        r = conflict.iloc[0]
        raise RsnaError(f"{where}: {len(conflict)} images' cancer label differs from their folder "
                        f"(image_id {r.image_id}: {'malignant' if r.cancer else 'benign'}/ but "
                        f"cancer={r.meta_cancer} in the table, {r.path}); fix the folder or the table")
    return j.drop(columns=["_merge", "meta_patient_id", "meta_cancer"])


def side_of_breast(gray: np.ndarray) -> str:
    """"L" when the breast's mass lies in the left half of the image, else "R" (the export
    has no ImageLaterality; what matters is that the views of one breast agree)."""
    g = gray.astype(np.float32)
    border = np.median(np.concatenate([g[:, :4].ravel(), g[:, -4:].ravel()]))
    mass = np.abs(g - border)
    cols = mass.sum(0)
    half = len(cols) // 2
    return "L" if cols[:half].sum() >= cols[half:].sum() else "R"


def is_inverted(gray: np.ndarray) -> bool:
    """True for a MONOCHROME1 mammogram exported with its stored values shown as is (background
    white, dense tissue dark): `roi.looks_inverted`, the check preprocessing also makes after
    windowing. On the RSNA export it splits the images with a wide margin, also where the
    breast reaches both sides of the stretched frame."""
    from rsna_utils.image.roi import looks_inverted
    return looks_inverted(gray)


def _wrap_one(args) -> dict:
    path, out_path, row = args
    import cv2

    from rsna_utils.sources.synth import encode_dicom
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise RsnaError(f"{path}: unreadable image")
    stored = gray.astype(np.uint16) * 16 + 8           # 8-bit export -> 12-bit stored values
    mass_side = side_of_breast(gray)
    inverted = is_inverted(gray)
    # machine 48 writes MONOCHROME1 (its PixelPaddingValue 4095 lies above every wrapped value);
    # the encoding's machine, not the table's (whose images this export no longer shows as stored)
    r = dict(row, laterality=row.get("laterality") or mass_side, view=row.get("view") or "UNK",
             machine_id=48 if inverted else 216, modality_absent=0,
             encoding="j2k" if row["image_id"] % 2 else "jpll", jp2=bool(row["image_id"] % 4 == 1))
    ds = encode_dicom(stored, r, ([2048.0], [4096.0]), seed=0)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return dict(image_id=row["image_id"], laterality=r["laterality"], view=r["view"],
                mass_side=mass_side, wrap_machine=r["machine_id"])


def wrap(src: str | Path, out: str | Path, test_frac: float = 0.25, seed: int = 0,
         workers: int | None = None, limit: int | None = None, progress: bool = True,
         meta: str | Path | None = None) -> dict:
    """Write out/train_images, out/test_images (DICOM), train.csv, test.csv, test_labels.csv,
    sample_submission.csv. Patients are split train/test (stratified by whether the patient
    has a cancer). `meta`: the competition's train.csv; its laterality and view go into the
    headers and CSVs, its other columns into train.csv / test.csv (`join_metadata`). Returns
    counts, with how often the pixel-mass side agrees with the true laterality."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    df = list_images(src)
    if meta is not None:
        df = join_metadata(df, meta)
    if limit:
        keep = df.drop_duplicates("patient_id").sample(frac=1, random_state=seed).patient_id
        chosen, n = [], 0
        for p in keep:
            chosen.append(p)
            n += int((df.patient_id == p).sum())
            if n >= limit:
                break
        df = df[df.patient_id.isin(chosen)].reset_index(drop=True)
    out = Path(out)
    df["fold"] = holdout_split(df, test_frac, seed)     # by patient and label only
    df["part"] = np.where(df.fold == 1, "test", "train")
    known = ["laterality", "view"] if meta is not None else []
    jobs = [(r.path, str(dicom_path(out / f"{r.part}_images", r.patient_id, r.image_id)),
             dict(patient_id=int(r.patient_id), image_id=int(r.image_id),
                  **{k: getattr(r, k) for k in known})) for r in df.itertuples()]
    res = []
    workers = workers or min(os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(workers) as ex:
        for r in tqdm(ex.map(_wrap_one, jobs, chunksize=8), total=len(jobs), desc="wrap",
                      disable=not progress):
            res.append(r)
    df = df.drop(columns=known).merge(pd.DataFrame(res), on="image_id")
    if meta is None:        # what the export alone says
        df["site_id"], df["age"], df["implant"] = 1, np.nan, 0
        df["machine_id"] = df.wrap_machine
        for c in ("biopsy", "invasive", "BIRADS", "density", "difficult_negative_case"):
            df[c] = np.nan
    df["prediction_id"] = prediction_id(df.patient_id, df.laterality)
    out.mkdir(parents=True, exist_ok=True)
    train, test = df[df.part == "train"], df[df.part == "test"]
    train[TRAIN_COLUMNS].to_csv(out / "train.csv", index=False)
    test[TEST_COLUMNS].to_csv(out / "test.csv", index=False)
    test[["prediction_id", "patient_id", "image_id", "cancer"]].to_csv(out / "test_labels.csv", index=False)
    pd.DataFrame({"prediction_id": test.prediction_id.drop_duplicates(), "cancer": 0.0})[
        SUBMISSION_COLUMNS].to_csv(out / "sample_submission.csv", index=False)
    counts = dict(out=str(out), train_images=len(train), test_images=len(test),
                  train_patients=int(train.patient_id.nunique()),
                  test_patients=int(test.patient_id.nunique()),
                  train_positive=int(train.cancer.sum()), test_positive=int(test.cancer.sum()),
                  monochrome1=int((df.wrap_machine == 48).sum()),
                  metadata=None if meta is None else str(meta))
    if meta is not None:
        counts.update(laterality_check(df))
    (out / WRAP_FILE).write_text(json.dumps({"version": WRAP_VERSION, **counts}, indent=2))
    df[["image_id", "laterality", "mass_side", "wrap_machine"]].to_csv(out / "wrap_sides.csv",
                                                                       index=False)
    return counts


def laterality_check(df: pd.DataFrame) -> dict:
    """How often the pixel-mass rule (`side_of_breast`, what the wrap used without metadata)
    names the true laterality, and how many breasts have both a CC and an MLO view."""
    agree = df.mass_side == df.laterality
    views = df.groupby(["patient_id", "laterality"]).view.agg(set)
    return dict(mass_side_agrees=int(agree.sum()), mass_side_checked=int(len(df)),
                mass_side_agreement=round(float(agree.mean()), 4),
                breasts=int(len(views)),
                breasts_with_cc_and_mlo=int(sum({"CC", "MLO"} <= v for v in views)))


def check_wrapped(out: str | Path) -> bool:
    """True when `out` holds a wrap made by this version; False when nothing is wrapped there
    yet; an older wrap is an error naming it (its PNGs would keep the old pixels)."""
    out = Path(out)
    if not (out / "train.csv").exists():
        return False
    try:
        version = json.loads((out / WRAP_FILE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = 1
    if version != WRAP_VERSION:
        raise RsnaError(f"{out}: wrapped by an older version ({version}; now {WRAP_VERSION}: "
                        "the competition's metadata joined); delete it and the PNG folders "
                        "made from it, or wrap into another folder")
    return True
