"""Synthetic RSNA-shaped dataset: CSVs and DICOM files with the real data's shape and quirks.

The real competition data (314 GB, Kaggle terms) cannot be fetched here, so every command,
notebook and test runs on this generator's output. It reproduces what breaks pipelines on the
real data: two JPEG encodings (JPEG 2000 in a JP2 container or raw, JPEG Lossless SV1), a few
uncompressed and RLE files, 12-bit and 16-bit stored values, MONOCHROME1, SIGMOID windows,
several windows per file, rescale slope, PixelPaddingValue on some machines only, a missing
Modality tag, burned-in corner markers, implants and pacemaker-like objects, and planted
lesions on about 2% of breasts (both views of a positive breast carry one).

Everything is derived from one seed: the table of patients and images is drawn first, then
each image gets its own random stream, so the output does not depend on the worker count.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, progress_setting, setting
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import (  # noqa: F401 - the columns' names here are kept for callers
    SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS, dicom_path, prediction_id)
from rsna_utils.dicom.uids import (  # noqa: F401 - kept here for callers
    EXPLICIT_VR_LE, JPEG2000_LOSSLESS, JPEG_LOSSLESS_SV1, RLE_LOSSLESS)
# the generator's parts, their names kept here for callers: the machines (synth_machines), the
# tables (synth_plan), the pixels (synth_pixels) and the DICOM files (synth_dicom)
from rsna_utils.sources.synth_dicom import _uid, encode_dicom, make_image  # noqa: F401
from rsna_utils.sources.synth_machines import (  # noqa: F401
    ENCODING_SHARES, L_FULL, L_SMALL, M_FULL, M_SMALL, MACHINES, MAMMO_FOR_PRESENTATION, R_FULL,
    R_SMALL, S_FULL, S_SMALL, TEST_ONLY_MACHINES, TRANSFER_SYNTAX, Machine, _machine)
from rsna_utils.sources.synth_pixels import (  # noqa: F401
    _blob, _draw_glyphs, _smooth_noise, _window, render_image, to_stored)
from rsna_utils.sources.synth_plan import _draw_images, _draw_patients, plan_dataset  # noqa: F401


class SynthError(RsnaError, ValueError):
    """A bad option given to the generator (shown to the user as one line)."""


def _make_one(args) -> tuple[int, list]:
    row, size, seed, index, path = args
    _, objects, ds = make_image(row, size, seed, index)
    write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return index, [(row["image_id"],) + obj for obj in objects["lesions"]]


# what `synthesize` writes: removed first when it replaces a dataset, so that no image of the
# old one stays beside the new CSVs
SYNTH_FILES = ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv", "lesions.csv")
SYNTH_DIRS = ("train_images", "test_images")


def _remove_dataset(out: Path) -> None:
    import shutil
    for name in SYNTH_FILES:
        (out / name).unlink(missing_ok=True)
    for name in SYNTH_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


@dataclass
class SynthConfig(Config):
    """The settings of `rsna synth` (its flags derive from these fields) and of `synthesize`."""

    KIND = "synthetic data"
    ERROR = SynthError

    out: str = setting("data/synthetic", "output folder")
    patients: int = setting(200, "train patients (~4 images each)", ge=1)
    test_patients: int | None = setting(None, "test patients (default: patients // 5, at least "
                                        "2)", ge=0)
    seed: int = setting(0, "seed of every draw: the same seed writes the same files")
    positive_rate: float = setting(0.02, "share of patients with cancer in one breast", ge=0,
                                   le=1)
    size: str = setting("small", "small: ~512x416 (tests); full: 2294x1914 to 4096x3328 "
                        "(benchmarks)", choices=("small", "full"))
    workers: int | None = setting(None, "processes (default: all cores, at most 8)", ge=1)
    overwrite: bool = setting(False, "replace the dataset already in --out (a train.csv there "
                              "is refused without it)")
    progress: bool = progress_setting()

    def __post_init__(self):
        self.check_fields()
        if self.test_patients is None:
            self.test_patients = max(2, self.patients // 5)

    def run(self) -> dict:
        return write_dataset(self)


def synthesize(out: str | Path, **settings) -> dict:
    """`write_dataset` with the `SynthConfig` of these arguments."""
    return write_dataset(SynthConfig(out=out, **settings))


def write_dataset(cfg: SynthConfig) -> dict:
    """Write an RSNA-shaped dataset under `cfg.out` and return a summary dict. A folder that
    already holds a dataset (a train.csv) is refused unless `cfg.overwrite`, which removes the
    dataset's files first (SYNTH_FILES, SYNTH_DIRS; nothing else in the folder).

    Files: train.csv, test.csv, sample_submission.csv (the Kaggle columns), test_labels.csv
    (the hidden answers for the synthetic test set, for scoring), lesions.csv (planted lesion
    boxes), train_images/{patient_id}/{image_id}.dcm and test_images/...
    """
    out, patients, seed, size = cfg.out, cfg.patients, cfg.seed, cfg.size
    positive_rate, test_patients, workers = cfg.positive_rate, cfg.test_patients, cfg.workers
    overwrite, progress = cfg.overwrite, cfg.progress
    out = Path(out)
    if (out / "train.csv").exists():
        if not overwrite:
            raise SynthError(f"{out} already holds a dataset (train.csv): --overwrite replaces "
                             "it, or give another --out")
        _remove_dataset(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SynthError(f"cannot write to output folder '{out}': {e.strerror or e}; "
                         "choose a writable --out") from None

    train_rows, test_rows = plan_dataset(patients, seed, positive_rate, test_patients)

    jobs = []
    for split, rows in (("train", train_rows), ("test", test_rows)):
        for r in rows:
            path = dicom_path(out / f"{split}_images", r["patient_id"], r["image_id"])
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((r, size, seed, len(jobs), path))

    lesions: list = []
    workers = workers or min(os.cpu_count() or 1, 8)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs), desc=f"synth {size}", unit="img", disable=not progress,
               file=sys.stderr)
    if workers <= 1:
        for j in jobs:
            lesions += _make_one(j)[1]
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as ex:
            for _, les in ex.map(_make_one, jobs, chunksize=4):
                lesions += les
                bar.update()
    bar.close()

    train = pd.DataFrame(train_rows)
    train["BIRADS"] = train["BIRADS"].astype("float64")
    train["age"] = train["age"].astype("float64")
    train[TRAIN_COLUMNS].to_csv(out / "train.csv", index=False)
    test = pd.DataFrame(test_rows, columns=list(train_rows[0]) if train_rows else None)
    # both sides as str: pandas 3.0 refuses str + object on an empty frame (test_patients=0)
    test["prediction_id"] = prediction_id(test["patient_id"], test["laterality"])
    test[TEST_COLUMNS].to_csv(out / "test.csv", index=False)
    sub = pd.DataFrame({"prediction_id": test["prediction_id"].drop_duplicates(), "cancer": 0.021})
    sub[SUBMISSION_COLUMNS].to_csv(out / "sample_submission.csv", index=False)
    test[["prediction_id", "patient_id", "image_id", "cancer"]].to_csv(
        out / "test_labels.csv", index=False)
    pd.DataFrame(lesions, columns=["image_id", "kind", "y0", "x0", "y1", "x1"]).to_csv(
        out / "lesions.csv", index=False)
    return dict(out=str(out), train_images=len(train_rows), test_images=len(test_rows),
                train_positive_images=int(train["cancer"].sum()))
