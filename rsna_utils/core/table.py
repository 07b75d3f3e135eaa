"""The RSNA table, spelled once: the competition's columns, the breast key (`prediction_id`),
where an image's DICOM and PNG live, and the site ids of RSNA and of the sources `rsna ingest`
reads. Every layer reads the table, so it sits in `core`; the rest of the package builds these
through the functions here and never spells them itself (tests/core/test_table.py greps for that).

- train.csv: `TRAIN_COLUMNS`, one row per image; test.csv: `TEST_COLUMNS`; the submission:
  `SUBMISSION_COLUMNS`, one row per breast.
- `prediction_id(patient_id, laterality)`: `{patient_id}_{laterality}`, the breast a view
  belongs to (the submission's key); `patient_of(prediction_id)` reads the patient back.
- `dicom_path(images, patient_id, image_id)`: `{images}/{patient_id}/{image_id}.dcm`
  (train_images / test_images); `png_path(png_dir, patient_id, image_id)`:
  `{png_dir}/{patient_id}_{image_id}.png` (what `rsna preprocess` writes).
- `SOURCE_SITES`: source name -> its site ids (RSNA's own 1 and 2; CBIS-DDSM 101, VinDr-Mammo
  102, CMMD 103, the ids `rsna ingest` gives them).
- The patient split (`holdout_split`, `patient_folds`, `check_split`): always by patient, for
  training's validation and for the held-out part a real-image folder is wrapped with.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError

TRAIN_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer",
                 "biopsy", "invasive", "BIRADS", "implant", "density", "machine_id",
                 "difficult_negative_case"]
TEST_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "implant",
                "machine_id", "prediction_id"]
SUBMISSION_COLUMNS = ["prediction_id", "cancer"]

# RSNA's own two sites, and the site `rsna ingest` gives each format it reads
RSNA_SITES = (1, 2)
SOURCE_SITES = {"rsna": RSNA_SITES, "cbis-ddsm": (101,), "vindr": (102,), "cmmd": (103,)}

DICOM_GLOB = "*/*.dcm"            # the DICOMs of an images folder ({patient_id}/{image_id}.dcm)


def prediction_id(patient_id, laterality):
    """The breast key `{patient_id}_{laterality}`: of one patient and side (str), or of two
    columns (a Series of str, element-wise)."""
    if isinstance(patient_id, pd.Series) or isinstance(laterality, pd.Series):
        return patient_id.astype(str) + "_" + laterality.astype(str)
    return f"{patient_id}_{laterality}"


def with_prediction_id(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `prediction_id` column: its own when it has one, else built from
    patient_id and laterality (a copy; `df` is left as it is)."""
    if "prediction_id" in df:
        return df
    return df.assign(prediction_id=prediction_id(df["patient_id"], df["laterality"]))


def patient_of(prediction_ids: pd.Series) -> pd.Series:
    """The patient_id part (str) of each `{patient_id}_{laterality}`."""
    return prediction_ids.astype(str).str.rsplit("_", n=1).str[0]


def dicom_path(images, patient_id, image_id) -> Path:
    """`{images}/{patient_id}/{image_id}.dcm`: an image's DICOM in train_images / test_images."""
    return Path(images) / str(patient_id) / f"{image_id}.dcm"


def png_name(patient_id, image_id) -> str:
    """`{patient_id}_{image_id}.png`: the file name `rsna preprocess` gives an image."""
    return f"{patient_id}_{image_id}.png"


def png_path(png_dir, patient_id, image_id) -> Path:
    """`{png_dir}/{patient_id}_{image_id}.png`."""
    return Path(png_dir) / png_name(patient_id, image_id)


# The patient split: a patient's images are all on one side
def patient_folds(df: pd.DataFrame, n_splits: int = 5, seed: int = 42,
                  label: str = "cancer") -> pd.Series:
    """Fold number per row: StratifiedGroupKFold on `label`, grouped by patient_id."""
    from sklearn.model_selection import StratifiedGroupKFold
    n_pat = df["patient_id"].nunique()
    if n_splits < 2 or n_splits > n_pat:
        raise RsnaError(f"n_splits={n_splits}: need 2..{n_pat} (the number of patients)")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1)
    for k, (_, val) in enumerate(sgkf.split(df, df[label], groups=df["patient_id"])):
        fold[val] = k
    return pd.Series(fold, index=df.index, name="fold")


def holdout_split(df: pd.DataFrame, val_frac: float = 0.15, seed: int = 42,
                  label: str = "cancer") -> pd.Series:
    """0 = train, 1 = validation: a patient-grouped split stratified by whether the patient has
    any positive image (the patient's highest `label`: a label of more classes, such as
    `learn.mix`'s source x cancer strata, is stratified over each)."""
    if not 0 < val_frac < 1:
        raise RsnaError(f"val_frac={val_frac}: give a fraction in (0, 1), e.g. 0.15")
    rng = np.random.default_rng(seed)
    pos = df.groupby("patient_id")[label].max()
    val: set = set()
    for cls in sorted({0, 1} | set(pos.unique().tolist())):
        pats = pos.index[pos == cls].to_numpy().copy()
        rng.shuffle(pats)
        val |= set(pats[: int(round(len(pats) * val_frac))])
    return pd.Series(df["patient_id"].isin(val).astype(int), index=df.index, name="fold")


def check_split(train: pd.DataFrame, val: pd.DataFrame, where: str, label: str = "cancer") -> None:
    if set(train.patient_id) & set(val.patient_id):
        raise RsnaError(f"{where}: a patient is on both sides of the split")
    for name, d in (("training", train), ("validation", val)):
        if len(d) == 0 or d[label].sum() == 0:
            raise RsnaError(f"{where}: the {name} side has no positive images; use fewer folds, "
                            "a larger val fraction, or more data (synthetic: raise --positive-rate)")
