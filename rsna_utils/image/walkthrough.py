"""One image through every preprocessing step, for the preprocessing demo notebook (not `rsna
explain`: its exam reports are reports/exam.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from rsna_utils.dicom.reader import read_dicom
from rsna_utils.image import roi
from rsna_utils.core.table import dicom_path
from rsna_utils.image.plan import apply_numpy, make_plan
from rsna_utils.image.convert import PreprocessConfig
from rsna_utils.image.voi import Window, apply_lut, build_lut


def explain_image(path: str | Path, cfg: PreprocessConfig | None = None) -> dict:
    """{step name: (image, note)}: stored values, LINEAR and SIGMOID windows, MONOCHROME1
    handling, the ROI mask with its box, the crop, the final image. Every step is read from the
    image's plan (`rsna_utils.image.plan`), the one the CPU and GPU paths apply."""
    cfg = cfg or PreprocessConfig()
    im = read_dicom(path)
    h, px = im.header, im.pixels
    small = roi.subsample(px, cfg.roi_max_side)
    plan = make_plan(h, small, cfg, px.shape, lambda: px.min() == px.max())
    steps = {"stored values": (_stretch(small), f"{h.bits_stored}-bit, {h.photometric}")}
    c = plan.window.center if plan.window.center is not None else float(np.median(small))
    w = plan.window.width if plan.window.width is not None else float(small.max() - small.min())
    for kind in ("LINEAR", "SIGMOID"):
        lut, off = build_lut(replace(h, photometric="MONOCHROME2"), Window(kind, c, w, None))
        steps[f"{kind} window"] = (apply_lut(small, lut, off), f"c={c:g} w={w:g}")
    chosen = plan.small8
    if h.monochrome1:
        steps["MONOCHROME1 inverted"] = (chosen, "minimum is white: inverted")
    steps["file's window"] = (chosen, plan.window.describe())
    if plan.mask is not None:
        fy, fx = small.shape[0] / plan.rows, small.shape[1] / plan.columns
        b = plan.box
        y0, x0 = int(b.y0 * fy), int(b.x0 * fx)
        y1, x1 = int(np.ceil(b.y1 * fy)), int(np.ceil(b.x1 * fx))
        overlay = cv2.cvtColor(chosen, cv2.COLOR_GRAY2RGB)
        overlay[plan.mask] = (0.6 * overlay[plan.mask] + [0, 90, 0]).astype(np.uint8)
        cv2.rectangle(overlay, (x0, y0), (x1 - 1, y1 - 1), (255, 0, 0), 2)
        steps["ROI mask + box"] = (overlay, str(b))
        steps["cropped"] = (chosen[y0:y1, x0:x1], f"{b.height}x{b.width} at full resolution (shown subsampled)")
    out = apply_numpy(px, plan)
    steps["resized (final)"] = (out, f"{out.shape[0]}x{out.shape[1]}, flipped={plan.flipped}")
    return steps


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return ((a.astype(np.float32) - lo) / max(hi - lo, 1) * 255).astype(np.uint8)


def pick_example(data_dir: str | Path) -> str:
    """A training image worth explaining: a positive with a SIGMOID window or MONOCHROME1 if
    the data has one, else the first positive, else the first image."""
    import pandas as pd

    from rsna_utils.dicom.header import read_header
    df = pd.read_csv(Path(data_dir) / "train.csv")
    df = pd.concat([df[df.cancer == 1], df[df.cancer == 0]]).head(60)
    paths = [dicom_path(Path(data_dir) / "train_images", r.patient_id, r.image_id)
             for r in df.itertuples()]
    for p in paths:
        h = read_header(p)
        if h.voi_function == "SIGMOID" or h.monochrome1:
            return str(p)
    return str(paths[0])


def sample_outputs(png_dir: str | Path, n: int = 12, seed: int = 0):
    """Some written PNGs and their names, for a grid."""
    import pandas as pd
    meta = pd.concat([pd.read_csv(p) for p in Path(png_dir).glob("meta*.csv")])
    pick = meta.sample(min(n, len(meta)), random_state=seed)
    imgs = [cv2.imread(str(Path(png_dir) / p), cv2.IMREAD_UNCHANGED) for p in pick["png"]]
    return imgs, [f"{p} {w.split('(')[0]}" for p, w in zip(pick["png"], pick["window"])]
