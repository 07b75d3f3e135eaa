"""The RSNA table, spelled once: the competition's columns, the breast key (`prediction_id`),
where an image's DICOM and PNG live, and the site ids of RSNA and of the sources `rsna ingest`
reads. Every layer reads the table, so it sits in `core`; the rest of the package builds these
through the functions here and never spells them itself (tests/test_table.py greps for that).

- train.csv: `TRAIN_COLUMNS`, one row per image; test.csv: `TEST_COLUMNS`; the submission:
  `SUBMISSION_COLUMNS`, one row per breast.
- `prediction_id(patient_id, laterality)`: `{patient_id}_{laterality}`, the breast a view
  belongs to (the submission's key); `patient_of(prediction_id)` reads the patient back.
- `dicom_path(images, patient_id, image_id)`: `{images}/{patient_id}/{image_id}.dcm`
  (train_images / test_images); `png_path(png_dir, patient_id, image_id)`:
  `{png_dir}/{patient_id}_{image_id}.png` (what `rsna preprocess` writes).
- `SOURCE_SITES`: source name -> its site ids (RSNA's own 1 and 2; CBIS-DDSM 101, VinDr-Mammo
  102, CMMD 103, the ids `rsna ingest` gives them).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

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
