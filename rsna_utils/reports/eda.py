"""Exploration helpers for the EDA notebook: the tables and the DICOM header scan."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError


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
        path = Path(data_dir) / f"{split}_images" / str(r.patient_id) / f"{r.image_id}.dcm"
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
        im = read_dicom(Path(data_dir) / "train_images" / str(r.patient_id) / f"{r.image_id}.dcm")
        disp, _ = apply_voi_lut(im.pixels, im.header)
        f = max(disp.shape) / max_side
        disp = cv2.resize(disp, (int(disp.shape[1] / f), int(disp.shape[0] / f)), interpolation=cv2.INTER_AREA)
        imgs.append(disp)
        titles.append(f"{r.patient_id}_{r.laterality} {r.view} cancer={r.cancer}")
    return imgs, titles


def timing_summary(png_dir: str | Path) -> pd.DataFrame:
    """Per transfer syntax: images, median decode and total ms (from meta.csv)."""
    meta = pd.concat([pd.read_csv(p) for p in Path(png_dir).glob("meta*.csv")])
    return meta.groupby(["transfer_syntax", "backend"]).agg(
        images=("image_id", "size"), decode_ms=("decode_ms", "median"),
        total_ms=("total_ms", "median")).reset_index()
