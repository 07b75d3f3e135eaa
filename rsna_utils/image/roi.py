"""Breast region of interest, orientation and resizing.

The breast is found on a subsampled 8-bit copy (fast: a 4096 x 3328 image becomes about
512 x 416): threshold, a small opening that cuts thin bridges to markers and labels, then the
largest connected component. Burned-in text and markers are separate, smaller components, so
they fall outside the box even when they touch the image border.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Box:
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def scaled(self, fy: float, fx: float, rows: int, cols: int) -> "Box":
        return Box(max(0, int(np.floor(self.y0 * fy))), max(0, int(np.floor(self.x0 * fx))),
                   min(rows, int(np.ceil(self.y1 * fy))), min(cols, int(np.ceil(self.x1 * fx))))

    def __str__(self) -> str:
        return f"{self.y0}:{self.y1},{self.x0}:{self.x1}"


def subsample(pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Every k-th pixel so the longer side is at most max_side: 10x cheaper than an area
    downscale, and enough to threshold and find the breast (not to read lesions)."""
    k = int(np.ceil(max(pixels.shape) / max_side))
    return np.ascontiguousarray(pixels[::k, ::k]) if k > 1 else pixels


def looks_inverted(img: np.ndarray, edge: int = 4) -> bool:
    """True when the image's edges hold more near-white than near-black pixels: a mammogram
    shown as a negative (background white, dense tissue dark), e.g. a MONOCHROME1 image whose
    stored values were exported as they are, or a file whose PhotometricInterpretation says the
    opposite of its pixels. Tissue touching an edge is mid-grey either way; the background
    decides. Made for mammograms, whose background is directly exposed (black when shown
    right): other X-rays are often collimated, and their unexposed edges are rightly white.
    `img`: any 2-D grey image (integers use their dtype's range, floats 0..1)."""
    g = np.asarray(img)
    top = float(np.iinfo(g.dtype).max) if np.issubdtype(g.dtype, np.integer) else 1.0
    e = max(1, min(edge, min(g.shape[:2]) // 2))
    edges = np.concatenate([g[:, :e].ravel(), g[:, -e:].ravel(), g[:e].ravel(), g[-e:].ravel()])
    return int((edges >= 0.9 * top).sum()) > int((edges <= 0.1 * top).sum())


def breast_mask(img8: np.ndarray, open_frac: float = 0.01, band_frac: float = 0.015) -> np.ndarray:
    """Largest bright connected region of an 8-bit image (the breast), as a bool mask.

    A band of `band_frac` along the image border is ignored: scanned films and some detectors
    have bright frames or collimator edges there that would join the breast to the border.
    `find_breast` extends the box back to the edge where the breast reaches the band.
    """
    nz = img8[img8 > 0]
    if nz.size == 0:
        return np.zeros(img8.shape, bool)
    otsu, _ = cv2.threshold(img8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Half of Otsu keeps the dim skin line; a floor stops noise in near-black backgrounds.
    t = float(np.clip(0.5 * otsu, 5, 80))
    binary = (img8 > t).astype(np.uint8)
    b = band_width(img8.shape, band_frac)
    if b:
        binary[:b], binary[-b:], binary[:, :b], binary[:, -b:] = 0, 0, 0, 0
    k = max(3, int(round(open_frac * max(img8.shape))) | 1)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.zeros(img8.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def mask_box(mask: np.ndarray) -> Box | None:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return Box(int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)


def band_width(shape: tuple[int, int], band_frac: float = 0.015) -> int:
    return int(round(band_frac * max(shape))) if min(shape) > 64 else 0


def find_breast(img8: np.ndarray, band_frac: float = 0.015) -> tuple[np.ndarray, Box | None]:
    """Breast mask and its box on an 8-bit image; the box reaches the image edge where the
    breast touches the ignored border band (the chest wall side, usually)."""
    mask = breast_mask(img8, band_frac=band_frac)
    box = mask_box(mask)
    if box is None:
        return mask, None
    b = band_width(img8.shape, band_frac)
    rows, cols = img8.shape
    if b:
        box = Box(0 if box.y0 <= b else box.y0, 0 if box.x0 <= b else box.x0,
                  rows if box.y1 >= rows - b else box.y1, cols if box.x1 >= cols - b else box.x1)
    return mask, box


def add_margin(box: Box, margin: float, rows: int, cols: int) -> Box:
    """Grow the box by `margin` (a fraction of its size) on every side, within the image."""
    dy, dx = int(round(box.height * margin)), int(round(box.width * margin))
    return Box(max(0, box.y0 - dy), max(0, box.x0 - dx), min(rows, box.y1 + dy),
               min(cols, box.x1 + dx))


def faces_left(mask: np.ndarray) -> bool:
    """True when the chest wall is on the left: more breast pixels in the left half."""
    half = mask.shape[1] // 2
    return int(mask[:, :half].sum()) >= int(mask[:, half:].sum())


def needs_flip(mode: str, mask: np.ndarray | None, laterality: str | None) -> bool:
    """Whether to mirror so the chest wall ends up on the left.

    mode: "none"; "mass" (pixel mass of the breast mask: robust to files stored either way);
    "laterality" (R is flipped; uses pixel mass when the tag is missing).
    """
    if mode == "none":
        return False
    if mode == "laterality" and laterality in ("L", "R"):
        return laterality == "R"
    if mode in ("mass", "laterality"):
        return mask is not None and not faces_left(mask)
    raise ValueError(f"flip mode {mode!r}: choose none, mass or laterality")


def fit_shape(h: int, w: int, size: tuple[int, int], mode: str = "pad") -> tuple[int, int]:
    """(height, width) that an (h, w) image is resized to: the target for "stretch"; the
    largest size with the image's aspect ratio inside the target for "pad"."""
    th, tw = size
    if mode == "stretch":
        return th, tw
    if mode != "pad":
        raise ValueError(f"resize mode {mode!r}: choose stretch or pad")
    s = min(th / h, tw / w)
    return min(th, max(1, int(round(h * s)))), min(tw, max(1, int(round(w * s))))


def resize_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area interpolation when shrinking, linear when enlarging (OpenCV)."""
    nh, nw = shape
    h, w = img.shape[:2]
    if (h, w) == (nh, nw):
        return img
    interp = cv2.INTER_AREA if (h >= nh or w >= nw) else cv2.INTER_LINEAR
    return cv2.resize(img, (nw, nh), interpolation=interp)


def pad_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Place img at the top left of a black (0) canvas of `size`. Called on output values
    (after windowing and flipping), so the padding is background on every photometric
    interpretation and the chest wall stays on the left edge."""
    th, tw = size
    if img.shape[:2] == (th, tw):
        return img
    out = np.zeros((th, tw), dtype=img.dtype)
    out[:img.shape[0], :img.shape[1]] = img
    return out


def resize(img: np.ndarray, size: tuple[int, int], mode: str = "stretch") -> np.ndarray:
    """Resize an output image (0 = background) to (height, width): "stretch" fills the target;
    "pad" keeps the aspect ratio and pads with 0 at the right / bottom. The one resize of
    training (PNG -> model input) and inference."""
    return pad_to(resize_to(img, fit_shape(*img.shape[:2], size, mode)), size)
