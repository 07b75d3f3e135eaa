"""VOI LUT windowing as a lookup table over the stored-value range (PS3.3 C.11.2).

One table maps every possible stored value to the displayed gray level: Modality rescale
(C.11.1), then the VOI LUT Sequence (C.11.2.1.1) or the window (C.11.2.1.2 / C.11.2.1.3),
then MONOCHROME1 inversion. The table has at most 65,536 entries, so building it is cheap
and applying it is one `np.take` per pixel, with no float image ever made.

Reference: pydicom's `apply_modality_lut` + `apply_voi_lut`, scaled to 8 bits as
`round(255 * (v - y_min) / (y_max - y_min))` over pydicom's output range; the tests hold the
two within 1 gray level on real and synthetic files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna_utils.dicom.header import DicomHeader

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass
class Window:
    """What was applied: shown in meta.csv so a user can audit every image."""
    kind: str                # "LUT", "LINEAR", "LINEAR_EXACT", "SIGMOID", "FALLBACK"
    center: float | None
    width: float | None
    index: int | None
    note: str = ""

    def describe(self) -> str:
        if self.kind == "LUT":
            return f"LUT[{self.index}]"
        s = f"{self.kind}(c={self.center:g},w={self.width:g})"
        if self.index is not None:
            s += f"[{self.index}]"
        return s + (f" {self.note}" if self.note else "")


def _domain(h: DicomHeader) -> tuple[np.ndarray, int]:
    """All stored values the LUT must cover, and the offset to add before indexing."""
    if h.bits_allocated == 8:
        return (np.arange(-128, 128) if h.signed else np.arange(256)), (128 if h.signed else 0)
    if h.signed:
        return np.arange(-32768, 32768), 32768
    return np.arange(65536), 0


def _output_range(h: DicomHeader) -> tuple[float, float]:
    # pydicom / PS3.3 C.11.2.1.2: the window output spans the stored range, rescaled.
    if h.signed:
        lo, hi = -(2 ** (h.bits_stored - 1)), 2 ** (h.bits_stored - 1) - 1
    else:
        lo, hi = 0, 2 ** h.bits_stored - 1
    lo, hi = lo * h.rescale_slope + h.rescale_intercept, hi * h.rescale_slope + h.rescale_intercept
    return (lo, hi) if lo <= hi else (hi, lo)


def select_window(h: DicomHeader, index: int = 0, prefer_lut: bool = True,
                  pixels: np.ndarray | None = None) -> Window:
    """Choose what to apply. `index` picks among several windows/LUTs (clamped to the last)."""
    if h.voi_luts and (prefer_lut or not h.window_widths):
        return Window("LUT", None, None, min(index, len(h.voi_luts) - 1))
    n = min(len(h.window_centers), len(h.window_widths))
    func = h.voi_function if h.voi_function in VOI_FUNCTIONS else "LINEAR"
    note = "" if h.voi_function in VOI_FUNCTIONS else f"unknown VOILUTFunction {h.voi_function!r}, used LINEAR"
    # Try the requested window first, then the others: a file may carry one unusable window.
    order = [min(index, n - 1)] + [i for i in range(n) if i != min(index, n - 1)] if n else []
    for i in order:
        c, w = h.window_centers[i], h.window_widths[i]
        ok = np.isfinite(c) and np.isfinite(w) and (w >= 1 if func == "LINEAR" else w > 0)
        if ok:
            return Window(func, c, w, i, note if i == order[0] else
                          f"window {order[0]} invalid (width {h.window_widths[order[0]]:g})")
    # No usable window (absent, or width 0): LINEAR_EXACT over the image's own range,
    # ignoring padding pixels. PS3.3 leaves this to the application.
    why = "no window in header" if n == 0 else f"invalid window width {h.window_widths[order[0]]:g}"
    if pixels is None:
        lo, hi = _output_range(h)
    else:
        v = pixels
        if h.pixel_padding_value is not None:
            v = v[v != h.pixel_padding_value]
        if v.size == 0:
            lo, hi = _output_range(h)
        else:
            lo = float(v.min()) * h.rescale_slope + h.rescale_intercept
            hi = float(v.max()) * h.rescale_slope + h.rescale_intercept
            lo, hi = min(lo, hi), max(lo, hi)
    width = max(hi - lo, 1e-3)
    return Window("FALLBACK", (lo + hi) / 2, width, None, f"({why}: min-max of the image)")


def build_lut(h: DicomHeader, window: Window, out_bits: int = 8) -> tuple[np.ndarray, int]:
    """Table mapping stored value (+offset) to the displayed level in [0, 2**out_bits - 1].

    Returns (lut, offset): display = lut[stored + offset].
    """
    x, offset = _domain(h)
    top = 2 ** out_bits - 1
    v = x * h.rescale_slope + h.rescale_intercept        # PS3.3 C.11.1 Modality LUT (rescale)
    if window.kind == "LUT":
        item = h.voi_luts[window.index]
        # PS3.3 C.11.2.1.1: values below the first mapped one take the first entry,
        # above the last take the last entry.
        idx = np.clip(np.floor(v) - item.first_mapped, 0, len(item.data) - 1).astype(np.int64)
        y = item.data[idx].astype(np.float64) / (2 ** item.bits - 1)
    else:
        y_min, y_max = _output_range(h)
        c, w = window.center, window.width
        if window.kind == "LINEAR":             # PS3.3 C.11.2.1.2.1
            c, w = c - 0.5, w - 1
            y = np.where(v <= c - w / 2, 0.0,
                         np.where(v > c + w / 2, 1.0, (v - c) / max(w, 1e-9) + 0.5))
        elif window.kind in ("LINEAR_EXACT", "FALLBACK"):   # PS3.3 C.11.2.1.3.2
            y = np.where(v <= c - w / 2, 0.0, np.where(v > c + w / 2, 1.0, (v - c) / w + 0.5))
        elif window.kind == "SIGMOID":          # PS3.3 C.11.2.1.3.1
            y = 1.0 / (1.0 + np.exp(-4.0 * (v - c) / w))
        else:
            raise ValueError(f"unknown window kind {window.kind!r}")
        # pydicom maps to [y_min, y_max]; the display scale is that range, so y is already 0..1
        del y_min, y_max
    y = np.clip(y, 0.0, 1.0)
    if h.monochrome1:                           # PS3.3 C.7.6.3.1.2: minimum is white
        y = 1.0 - y
    dtype = np.uint8 if out_bits <= 8 else np.uint16
    return np.rint(y * top).astype(dtype), offset


def apply_lut(pixels: np.ndarray, lut: np.ndarray, offset: int) -> np.ndarray:
    """Look every pixel up (a view-safe, new array; the input is not modified)."""
    if offset:
        idx = pixels.astype(np.int32) + offset
        return np.take(lut, idx)
    return np.take(lut, pixels)


def apply_voi_lut(pixels: np.ndarray, h: DicomHeader, index: int = 0, out_bits: int = 8,
                  prefer_lut: bool = True) -> tuple[np.ndarray, Window]:
    """Window stored pixels to 8 (or 16) bits per the header; returns (image, window used)."""
    window = select_window(h, index, prefer_lut, pixels)
    lut, offset = build_lut(h, window, out_bits)
    return apply_lut(pixels, lut, offset), window
