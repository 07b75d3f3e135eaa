"""One plan per image, two kernels.

Everything that decides an output image is computed once, on the CPU, from the header and a
small subsample of the stored values (`make_plan`): the window and its lookup table, the breast
box, the flip and the output geometry. Two kernels apply a plan to the full-resolution stored
values: `apply_numpy` (OpenCV) and `apply_torch` (any torch device), with the same order of work
(crop; area resize; window; flip; pad with black after windowing) and the same resize filter:
OpenCV's INTER_AREA, which the torch kernel reproduces with the same pixel-coverage weights
(a few weighted gathers per axis; a crop that must be enlarged on an axis is rare and small,
and the torch kernel resizes it with OpenCV too). So the CPU path, the GPU path, inference and the explain
figure cannot drift apart: they share the plan, and the kernels agree to 1 gray level (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from rsna_utils.core.errors import RsnaError
from rsna_utils.image import roi
from rsna_utils.image.voi import Window, apply_lut, build_lut, select_window


class PreprocessError(RsnaError):
    """This image cannot be turned into a training image (recorded in failures.csv)."""


@dataclass
class ImagePlan:
    rows: int
    columns: int
    window: Window
    lut: np.ndarray              # stored value + offset -> output value (cfg.bits)
    offset: int
    box: roi.Box                 # crop, in full-resolution pixels
    flipped: bool                # mirror left-right after resizing
    shape: tuple[int, int]       # the resized crop (height, width), before padding
    size: tuple[int, int]        # the output (height, width)
    bits: int
    window_first: bool
    looks_inverted: bool = False  # white edges after windowing (`roi.looks_inverted`)
    small8: np.ndarray | None = None    # the windowed subsample (for figures)
    mask: np.ndarray | None = None      # the breast mask on it

    def meta(self, h) -> dict:
        """The meta.csv fields the plan decides."""
        b = self.box
        return dict(rows=self.rows, columns=self.columns, transfer_syntax=h.transfer_syntax,
                    photometric=h.photometric, crop_y0=b.y0, crop_x0=b.x0, crop_y1=b.y1,
                    crop_x1=b.x1, flipped=bool(self.flipped), window=self.window.describe(),
                    window_note=self.window.note, looks_inverted=bool(self.looks_inverted),
                    crop_reason=b.reason)


def subsample_step(shape: tuple[int, ...], max_side: int) -> int:
    """Every k-th pixel so the longer side is at most max_side (as roi.subsample)."""
    return max(1, int(np.ceil(max(shape[:2]) / max_side)))


def make_plan(h, small: np.ndarray, cfg, full_shape: tuple[int, int],
              full_is_flat: Callable[[], bool] = lambda: False) -> ImagePlan:
    """The plan of one image from its header, its subsample `small` (every k-th stored value,
    `subsample_step`) and the full image's shape. `full_is_flat` is asked only when the
    subsample is flat (an empty image has no breast). Raises PreprocessError."""
    path = h.path
    if small.min() == small.max() and full_is_flat():
        raise PreprocessError(f"{path}: every pixel is {int(small.flat[0])}; an empty image "
                              "has no breast")
    window = select_window(h, cfg.window_index, cfg.prefer_lut, small)
    lut, off = build_lut(h, window, cfg.bits)
    lut8 = lut if cfg.bits == 8 else (lut >> 8).astype(np.uint8)
    small8 = apply_lut(small, lut8, off)
    inverted = roi.looks_inverted(small8)
    if inverted and cfg.inverted == "fix":     # a negative: invert the output scale
        lut = (np.iinfo(lut.dtype).max - lut).astype(lut.dtype)
        small8 = 255 - small8
        window = replace(window, note=(f"{window.note}; " if window.note else "")
                         + "inverted: white at the edges after windowing")
    rows, cols = full_shape
    mask = None
    if cfg.crop:
        mask, box_small = roi.find_breast(small8)
        if box_small is None:
            raise PreprocessError(f"{path}: no breast region found after windowing "
                                  f"({window.describe()}); check the window or use crop=False")
        box = roi.add_margin(box_small.scaled(rows / small.shape[0], cols / small.shape[1],
                                              rows, cols), cfg.margin, rows, cols)
    else:
        box = roi.Box(0, 0, rows, cols, reason="crop off")
    flipped = roi.needs_flip(cfg.flip, mask if mask is not None else small8 > 0, h.laterality)
    shape = roi.fit_shape(box.height, box.width, cfg.size, cfg.resize_mode)
    return ImagePlan(rows, cols, window, lut, off, box, bool(flipped), shape, tuple(cfg.size),
                     cfg.bits, cfg.window_first, bool(inverted), small8, mask)


# ----------------------------------------------------------------------------------------
# The numpy kernel (OpenCV)
# ----------------------------------------------------------------------------------------

def apply_numpy(pixels: np.ndarray, plan: ImagePlan) -> np.ndarray:
    """Full-resolution stored values -> the output image (uint8 / uint16, plan.size)."""
    b = plan.box
    crop = pixels[b.y0:b.y1, b.x0:b.x1]
    if plan.window_first:
        out = roi.resize_to(apply_lut(crop, plan.lut, plan.offset), plan.shape)
    else:
        if crop.dtype == np.int16:   # cv2 area-resizes int16 poorly: go through float
            r = np.rint(roi.resize_to(crop.astype(np.float32), plan.shape)).astype(np.int16)
        else:
            r = roi.resize_to(crop, plan.shape)
        out = apply_lut(r, plan.lut, plan.offset)
    if plan.flipped:
        out = np.ascontiguousarray(out[:, ::-1])
    return roi.pad_to(out, plan.size)      # background after windowing: black on MONOCHROME1 too


# ----------------------------------------------------------------------------------------
# The torch kernel
# ----------------------------------------------------------------------------------------

def area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA when shrinking, as taps: output pixel i averages the input interval
    [i * s, (i + 1) * s), s = n_in / n_out >= 1, each input pixel weighted by the share of it
    inside. Returns (index, weight), both (K, n_out) with K = ceil(s) + 1 taps; weights of a
    column sum to 1 (taps past the interval weigh 0)."""
    s = n_in / n_out
    k = int(np.ceil(s)) + 1
    lo = np.arange(n_out) * s
    j = np.floor(lo)[None, :] + np.arange(k)[:, None]
    w = np.clip(np.minimum(lo + s, j + 1) - np.maximum(lo, j), 0, None) / s
    return np.clip(j, 0, n_in - 1).astype(np.int64), w


def _area_resize_torch(x, shape: tuple[int, int]):
    """Area resize of a float tensor (H, W), shrinking axes only: a few weighted gathers per
    axis (no dense matrix product, so no TF32 rounding and no wasted work on zeros)."""
    import torch
    h, w = x.shape
    nh, nw = shape
    out = x
    if nh != h:
        idx, wt = area_taps(h, nh)
        idx, wt = torch.as_tensor(idx, device=x.device), torch.as_tensor(wt, dtype=x.dtype,
                                                                          device=x.device)
        out = sum(wt[t][:, None] * out[idx[t]] for t in range(len(idx)))
    if nw != w:
        idx, wt = area_taps(w, nw)
        idx, wt = torch.as_tensor(idx, device=x.device), torch.as_tensor(wt, dtype=x.dtype,
                                                                          device=x.device)
        out = sum(wt[t][None, :] * out[:, idx[t]] for t in range(len(idx)))
    return out


def apply_torch(x, plan: ImagePlan) -> np.ndarray:
    """The numpy kernel's output from a stored-value tensor (H, W) on any device."""
    import torch
    b = plan.box
    crop = x[b.y0:b.y1, b.x0:b.x1]
    h, w = crop.shape
    nh, nw = plan.shape
    lut_t = torch.as_tensor(plan.lut.astype(np.int32), device=x.device)
    top = len(plan.lut) - 1

    def window(v):
        return lut_t[(v.to(torch.int64) + plan.offset).clamp_(0, top)]
    if (h, w) != (nh, nw) and (nh > h or nw > w):
        # an axis to enlarge: OpenCV's choice of filter then depends on both axes; such crops
        # are small (smaller than the output), so resize them exactly as the numpy kernel does
        arr = crop.cpu().numpy()
        if arr.dtype not in (np.uint16, np.int16):        # e.g. int32 after a DALI rescale
            arr = arr.astype(np.int16 if arr.min() < 0 else np.uint16)
        out = torch.as_tensor(apply_numpy(arr, _unpadded(plan)).astype(np.int32), device=x.device)
    else:
        if plan.window_first:
            r = _area_resize_torch(window(crop).to(torch.float32), (nh, nw))
            out = torch.floor(r + 0.5).to(torch.int32)     # cv2 rounds half up here
        else:
            r = _area_resize_torch(crop.to(torch.float32), (nh, nw))
            out = window(torch.floor(r + 0.5))
        if plan.flipped:
            out = torch.flip(out, dims=[1])
    if (nh, nw) != tuple(plan.size):   # background after windowing and flipping
        out = torch.nn.functional.pad(out, (0, plan.size[1] - nw, 0, plan.size[0] - nh))
    return out.cpu().numpy().astype(np.uint8 if plan.bits == 8 else np.uint16)


def _unpadded(plan: ImagePlan) -> ImagePlan:
    """The same plan on the crop alone (box = the whole crop), without the final padding."""
    from dataclasses import replace
    return replace(plan, box=roi.Box(0, 0, plan.box.height, plan.box.width), size=plan.shape)
