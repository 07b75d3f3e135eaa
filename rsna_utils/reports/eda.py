"""Exploration helpers for the EDA notebook: the tables and the DICOM header scan."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import dicom_path, prediction_id


def load_train(data_dir: str | Path) -> pd.DataFrame:
    p = Path(data_dir) / "train.csv"
    if not p.exists():
        raise RsnaError(f"{p}: not found; run `rsna synth --out {data_dir}` or point data_dir at "
                        "the Kaggle data")
    return pd.read_csv(p)


def scan_headers(data_dir: str | Path, split: str = "train", limit: int | None = None,
                 seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Header fields of (a random sample of) the DICOM files, one row per image."""
    from tqdm.auto import tqdm

    from rsna_utils.dicom.header import read_header, transfer_syntax_name
    df = pd.read_csv(Path(data_dir) / f"{split}.csv")
    if limit is not None and limit < len(df):
        df = df.sample(limit, random_state=seed)
    rows = []
    for r in tqdm(df.itertuples(), total=len(df), desc="headers", disable=not progress,
                  file=sys.stderr):
        path = dicom_path(Path(data_dir) / f"{split}_images", r.patient_id, r.image_id)
        try:
            h = read_header(path)
        except RsnaError as e:
            rows.append(dict(image_id=r.image_id, error=str(e)))
            continue
        rows.append(dict(image_id=r.image_id, transfer_syntax=transfer_syntax_name(h.transfer_syntax),
                         photometric=h.photometric, voi_function=h.voi_function,
                         n_windows=len(h.window_widths), voi_lut=len(h.voi_luts) > 0,
                         bits_stored=h.bits_stored, rows=h.rows, columns=h.columns,
                         rescale=(h.rescale_slope, h.rescale_intercept) != (1.0, 0.0),
                         padding=h.pixel_padding_value is not None, modality=h.modality,
                         laterality=h.laterality, view=h.view))
    return pd.DataFrame(rows)


def sample_images(data_dir: str | Path, n: int = 12, seed: int = 0, positives: int | None = None,
                  max_side: int = 384) -> tuple[list[np.ndarray], list[str]]:
    """Windowed (not cropped) images for a grid, positives first: (images, titles)."""
    import cv2

    from rsna_utils.dicom.reader import read_dicom
    from rsna_utils.image.voi import apply_voi_lut
    df = load_train(data_dir)
    positives = n // 3 if positives is None else positives
    pos = df[df.cancer == 1]
    pick = pd.concat([pos.sample(min(positives, len(pos)), random_state=seed),
                      df[df.cancer == 0].sample(n - min(positives, len(pos)), random_state=seed)])
    imgs, titles = [], []
    for r in pick.itertuples():
        im = read_dicom(dicom_path(Path(data_dir) / "train_images", r.patient_id, r.image_id))
        disp, _ = apply_voi_lut(im.pixels, im.header)
        f = max(disp.shape) / max_side
        disp = cv2.resize(disp, (int(disp.shape[1] / f), int(disp.shape[0] / f)), interpolation=cv2.INTER_AREA)
        imgs.append(disp)
        titles.append(f"{prediction_id(r.patient_id, r.laterality)} {r.view} cancer={r.cancer}")
    return imgs, titles


def timing_summary(png_dir: str | Path) -> pd.DataFrame:
    """Per transfer syntax: images, median decode and total ms (from meta.csv)."""
    meta = pd.concat([pd.read_csv(p) for p in Path(png_dir).glob("meta*.csv")])
    return meta.groupby(["transfer_syntax", "backend"]).agg(
        images=("image_id", "size"), decode_ms=("decode_ms", "median"),
        total_ms=("total_ms", "median")).reset_index()


def balance_note(train: pd.DataFrame, target_ratio: float = 1 / 8, batch_size: int = 16,
                 min_positives: int = 1) -> str:
    """What the class-balance chart shows, in words from the data it shows: the positive share
    of images, breasts and patients, what accuracy would say, and what the kaggle plan's
    balance (a sampler at 1 positive to 7 negatives, at least one positive a batch, pos_weight
    1: `learn.data.balance`) makes of these images."""
    from rsna_utils.learn.samplers import balance
    y = train["cancer"].to_numpy()
    n, k = len(y), int((y > 0.5).sum())
    if n == 0:
        return "No images: nothing to balance."
    breast = train.groupby(["patient_id", "laterality"]).cancer.max()
    patient = train.groupby("patient_id").cancer.max()
    share = k / n
    text = (f"Here {share:.1%} of the images are positive ({k:,} of {n:,}), {breast.mean():.1%} "
            f"of the breasts and {patient.mean():.1%} of the patients (on the real data about "
            f"2%, 2% and 4%). A model that answers \"no cancer\" everywhere is {1 - share:.1%} "
            "accurate on these images and has a pF1 of zero, so accuracy says nothing here. ")
    if k == 0:
        return text + "With no positive image there is nothing to learn the cancer class from."
    b = balance(y, 1.0, target_ratio, batch_size, min_positives if k else 0, 1.0, 1.0)
    if share >= target_ratio:
        how = (f"these images are already {share:.1%} positive, more than its 1 in 8, so the "
               "sampler draws them as they come")
    else:
        how = (f"on these images each positive would be seen {b.exposures:.1f} times an epoch, "
               f"{b.epoch_share:.1%} of the images drawn")
    return text + ("The kaggle plan balances the classes with the sampler, not the loss: "
                   "positives drawn until they are 1 in 8 images (target_ratio \"1:7\", at least "
                   f"one a batch) and pos_weight 1; {how}.")
