"""Breast region of interest, orientation and resizing.

The breast is found on a subsampled 8-bit copy (fast: a 4096 x 3328 image becomes about
512 x 416). Two rules (`find_breast(img8, rule=...)`):

- "background" (the default, issue 38): the threshold sits just above the background's own
  level (the histogram's dark peak and its spread), so the dim fatty edge of a dense breast is
  kept; a small opening cuts thin bridges to markers and labels; the component is chosen by
  what a breast looks like (it lies on the chest-wall side edge; the largest such mass), and a
  second body part joined to it by a neck (an arm, the other side of the chest) is cut off by
  a larger opening of that component alone. Where the image has no dark background, or the
  result would be a sliver, the old rule is the fallback; where that fails too, the whole
  image. The box carries the reason (`Box.reason`, meta.csv's `crop_reason`).
- "otsu" (the rule before issue 38): half of Otsu's threshold, the small opening, the largest
  connected component.

Burned-in text and markers are separate, smaller components, so they fall outside the box even
when they touch the image border.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class Box:
    y0: int
    x0: int
    y1: int
    x1: int
    reason: str = field(default="", compare=False)   # why the crop is this box (meta.csv)

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def scaled(self, fy: float, fx: float, rows: int, cols: int) -> "Box":
        return Box(max(0, int(np.floor(self.y0 * fy))), max(0, int(np.floor(self.x0 * fx))),
                   min(rows, int(np.ceil(self.y1 * fy))), min(cols, int(np.ceil(self.x1 * fx))),
                   self.reason)

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
    """Largest bright connected region of an 8-bit image (the breast), as a bool mask: the
    rule before issue 38 ("otsu"), kept as `find_breast`'s fallback.

    A band of `band_frac` along the image border is ignored: scanned films and some detectors
    have bright frames or collimator edges there that would join the breast to the border.
    `find_breast` extends the box back to the edge where the breast reaches the band.
    """
    nz = img8[img8 > 0]
    if nz.size == 0:
        return np.zeros(img8.shape, bool)
    binary, _ = _opened(img8, _half_otsu(img8), band_frac, open_frac)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.zeros(img8.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def _half_otsu(img8: np.ndarray) -> float:
    """Half of Otsu's threshold: it keeps the dim skin line; a floor stops noise in near-black
    backgrounds."""
    otsu, _ = cv2.threshold(img8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(np.clip(0.5 * otsu, 5, 80))


def _opened(img8: np.ndarray, t: float, band_frac: float, open_frac: float) -> tuple[np.ndarray, int]:
    """(pixels above `t` with the border band cleared and a small opening, the band's width)."""
    binary = (img8 > t).astype(np.uint8)
    b = band_width(img8.shape, band_frac)
    if b:
        binary[:b], binary[-b:], binary[:, :b], binary[:, -b:] = 0, 0, 0, 0
    k = max(3, int(round(open_frac * max(img8.shape))) | 1)
    return cv2.morphologyEx(binary, cv2.MORPH_OPEN, cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (k, k))), b


def mask_box(mask: np.ndarray) -> Box | None:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return Box(int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)


def band_width(shape: tuple[int, int], band_frac: float = 0.015) -> int:
    return int(round(band_frac * max(shape))) if min(shape) > 64 else 0


def background_level(img8: np.ndarray, peak_frac: float = 0.02, max_spread: int = 40,
                     min_share: float = 0.03) -> tuple[int, int] | None:
    """(level, top) of the image's dark background: the histogram's peak among the darker half
    of the values and the first value above it where the count falls below `peak_frac` of the
    peak's (the peak's upper edge: noise, JPEG ringing, a detector's offset). None where there
    is no such background: the peak is bright, spread wider than `max_spread` gray levels, or
    holds less than `min_share` of the pixels (a breast or film filling the whole image)."""
    hist = cv2.calcHist([img8], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    total = int(hist.sum())
    if total == 0:
        return None
    median = int(np.searchsorted(np.cumsum(hist), total / 2))
    level = int(np.argmax(hist[:median + 1]))
    if level > 100:
        return None
    below = np.flatnonzero(hist[level + 1:] < peak_frac * hist[level])
    if below.size == 0 or below[0] + 1 > max_spread:
        return None
    top = level + int(below[0]) + 1          # first value outside the peak
    if hist[:top].sum() < min_share * total:
        return None
    return level, top


def _label(binary: np.ndarray):
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return n, labels, stats


def _side_contact(stats_row, cols: int, b: int) -> int:
    """-1 / +1 when a component's box reaches the left / right band (a chest-wall side), 0 when
    neither; the side with the larger reach when both (a breast filling the width)."""
    x0, w = int(stats_row[cv2.CC_STAT_LEFT]), int(stats_row[cv2.CC_STAT_WIDTH])
    left, right = x0 <= b, x0 + w >= cols - b
    if left and right:
        return 2
    return -1 if left else (1 if right else 0)


def _pick_breast(labels: np.ndarray, stats: np.ndarray, n: int, b: int, min_area: int) -> int:
    """The component that looks like a breast: on a chest-wall side edge (left or right), the
    largest such mass; a thin strip along the top or bottom corner (an arm, a shoulder) loses to
    a compact mass on the side edge. Falls back to the largest component. 0 when none."""
    rows, cols = labels.shape
    best, best_score = 0, -1.0
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        h, w = int(stats[i, cv2.CC_STAT_HEIGHT]), int(stats[i, cv2.CC_STAT_WIDTH])
        on_side = _side_contact(stats[i], cols, b) != 0
        fill = area / max(1, h * w)
        strip = min(h, w) < 0.15 * min(rows, cols) or fill < 0.2
        score = area * (2.0 if on_side else 1.0) * (0.25 if strip else 1.0)
        if score > best_score:
            best, best_score = i, score
    return best


def _cut_necks(comp: np.ndarray, b: int, neck_frac: float) -> tuple[np.ndarray, bool]:
    """Cut a second body part joined to the breast by a neck narrower than 2r (r = neck_frac
    of the longer side): erode the component by r; where that leaves more than one sizeable
    core, give each pixel of the component to its nearest core and keep the breast-like core's
    share (its skin line, nipple and corners stay: no opening of the breast itself). Returns
    (mask, whether a part was cut)."""
    step = 2 if max(comp.shape) > 256 else 1   # cores found on every other pixel: 4x cheaper
    full = comp
    comp = np.ascontiguousarray(comp[::step, ::step])
    r = max(2, int(round(neck_frac * max(comp.shape))))
    inside = cv2.distanceTransform(comp.astype(np.uint8), cv2.DIST_L2, 3)
    core = inside > r                   # the erosion by a disk of radius r, in linear time
    n, labels, stats = _label(core)
    if n <= 2:
        return full, False
    area = int(comp.sum())
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 0.01 * area]
    if len(big) <= 1:
        return full, False
    keep = _pick_breast(labels, stats, n, max(1, b // step), int(0.01 * area))
    if step > 1:            # the rare cut itself at full resolution: the cores scaled back up
        labels = np.repeat(np.repeat(labels, step, 0), step, 1)[:full.shape[0], :full.shape[1]]
        comp, area = full, int(full.sum())
    dist = {i: cv2.distanceTransform((labels != i).astype(np.uint8), cv2.DIST_L2, 3)
            for i in big}
    others = np.min([dist[i] for i in big if i != keep], axis=0)
    kept = comp & (dist[keep] <= others)
    n2, lab2, st2 = _label(kept)       # the kept share's piece that holds the core
    if n2 > 2:
        seed = lab2[labels == keep]
        kept = lab2 == np.bincount(seed[seed > 0]).argmax()
    # a cut counts only where it drops a real part
    if (area - int(kept.sum())) < 0.03 * area:
        return full, False
    return kept, True


def _waist_cut(mask: np.ndarray, waist_frac: float = 0.3, rise: float = 2.0) -> tuple[np.ndarray, bool]:
    """Cut a body part that enters from the top or bottom (an arm, the belly below the
    inframammary fold, the other side of the chest) where the breast's width per row pinches to
    a waist and widens again: from the widest row outwards, the first row where the width has
    fallen below `waist_frac` of the breast's widest and later grows back to `rise` times that
    waist and by a tenth of the widest. A breast tapers to its ends without a
    second bump, so it is left whole. Returns (mask, whether a part was cut)."""
    w = mask.sum(axis=1).astype(np.float32)
    k = max(1, mask.shape[0] // 100)
    w = np.convolve(w, np.ones(2 * k + 1, np.float32) / (2 * k + 1), mode="same")
    peak = int(np.argmax(w))
    wmax = float(w[peak])
    if wmax <= 0:
        return mask, False
    rows = mask.shape[0]
    lo, hi = 0, rows
    for step in (-1, 1):
        best, best_row = wmax, peak
        j = peak + step
        while 0 <= j < rows:
            if w[j] < best:
                best, best_row = float(w[j]), j
            elif best < waist_frac * wmax and w[j] >= max(rise * best, best + 0.1 * wmax):
                if step < 0:
                    lo = best_row + 1
                else:
                    hi = best_row
                break
            j += step
    if lo == 0 and hi == rows:
        return mask, False
    cut = mask.copy()
    cut[:lo], cut[hi:] = False, False
    n, labels, stats = _label(cut)          # the piece that holds the widest row
    if n > 2:
        seed = labels[peak][labels[peak] > 0]
        if seed.size:
            cut = labels == np.bincount(seed).argmax()
    return cut, True


def _strip_tails(mask: np.ndarray, img8: np.ndarray, t_old: float, narrow: float = 0.15,
                 min_len: float = 0.05) -> tuple[np.ndarray, bool]:
    """Trim the mask's top and bottom tails that are long thin strips: runs of rows from an
    end, each narrower than `narrow` of the widest row and mostly dim (fewer than half of its
    pixels above the old rule's threshold `t_old`: what the old rule kept stays), together
    longer than `min_len` of the height. A scanned film's glow along its chest-wall edge, a detector's margin or a sliver of
    body along the edge runs like that; a breast passes through such narrow rows within a few
    rows of its ends (those short runs are kept). Returns (mask, whether rows were trimmed)."""
    width = mask.sum(axis=1)
    bright = ((img8 > t_old) & mask).sum(axis=1)
    tail = (width < narrow * int(width.max())) & (2 * bright < width)
    rows = np.flatnonzero(width)
    first, last = int(rows[0]), int(rows[-1]) + 1
    lo, hi = first, last
    while lo < hi and tail[lo]:
        lo += 1
    while hi > lo and tail[hi - 1]:
        hi -= 1
    n = min_len * mask.shape[0]
    lo = lo if lo - first >= n else first
    hi = hi if last - hi >= n else last
    if (lo, hi) == (first, last) or hi - lo < 0.1 * mask.shape[0]:
        return mask, False
    cut = mask.copy()
    cut[:lo], cut[hi:] = False, False
    return cut, True


def breast_mask_background(img8: np.ndarray, open_frac: float = 0.01, band_frac: float = 0.015,
                           margin: int = 3, neck_frac: float = 0.05
                           ) -> tuple[np.ndarray | None, str]:
    """The breast by the background rule (module docstring): (mask, reason); mask None where
    the image has no dark background to set the threshold from, or nothing above it."""
    bg = background_level(img8)
    if bg is None:
        return None, "no dark background"
    level, top = bg
    # never above the old rule's threshold: the background rule only keeps more of the breast
    t_old = _half_otsu(img8)
    t = float(min(top - 1 + margin, max(level + 1, t_old)))
    binary, b = _opened(img8, t, band_frac, open_frac)
    n, labels, stats = _label(binary)
    pick = _pick_breast(labels, stats, n, b, max(4, int(0.005 * img8.size)))
    if pick == 0:
        return None, f"nothing above the background (background level {level} threshold {t:g})"
    mask = labels == pick
    mask, cut = _cut_necks(mask, b, neck_frac)
    mask, waist = _waist_cut(mask)
    mask, tails = _strip_tails(mask, img8, t_old)
    reason = f"background rule (background level {level} threshold {t:g})"
    if cut or waist:
        reason += "; second body part cut off"
    if tails:
        reason += "; thin strip along the edge trimmed"
    return mask, reason


def _is_sliver(box: Box | None, shape: tuple[int, int], min_frac: float = 0.1) -> bool:
    rows, cols = shape
    return box is None or box.height < min_frac * rows or box.width < min_frac * cols


def _to_edges(box: Box, shape: tuple[int, int], b: int) -> Box:
    rows, cols = shape
    if not b:
        return box
    return Box(0 if box.y0 <= b else box.y0, 0 if box.x0 <= b else box.x0,
               rows if box.y1 >= rows - b else box.y1, cols if box.x1 >= cols - b else box.x1,
               box.reason)


RULES = ("background", "otsu")


def find_breast(img8: np.ndarray, band_frac: float = 0.015, rule: str = "background"
                ) -> tuple[np.ndarray, Box | None]:
    """Breast mask and its box on an 8-bit image; the box reaches the image edge where the
    breast touches the ignored border band (the chest wall side, usually). `box.reason` says
    which rule made it and why.

    rule "background" (default): the background rule, with the old rule as the fallback and
    the whole image (mask all True) as the last resort, so it never returns an empty box or a
    sliver. rule "otsu": the rule before issue 38 alone (None where it finds nothing)."""
    if rule not in RULES:
        raise ValueError(f"roi rule {rule!r}: choose background or otsu")
    b = band_width(img8.shape, band_frac)
    if rule == "otsu":
        mask = breast_mask(img8, band_frac=band_frac)
        box = mask_box(mask)
        if box is None:
            return mask, None
        return mask, _to_edges(Box(box.y0, box.x0, box.y1, box.x1, "otsu rule"), img8.shape, b)
    mask, why = breast_mask_background(img8, band_frac=band_frac)
    if mask is not None:
        box = mask_box(mask)
        if not _is_sliver(box, img8.shape):
            return mask, _to_edges(Box(box.y0, box.x0, box.y1, box.x1, why), img8.shape, b)
        why = "background rule gave a sliver"
    mask = breast_mask(img8, band_frac=band_frac)
    box = mask_box(mask)
    if not _is_sliver(box, img8.shape):
        return mask, _to_edges(Box(box.y0, box.x0, box.y1, box.x1, f"otsu fallback: {why}"),
                               img8.shape, b)
    rows, cols = img8.shape
    what = "otsu rule found nothing" if box is None else "otsu rule gave a sliver too"
    return np.ones(img8.shape, bool), Box(0, 0, rows, cols, f"whole image: {why}; {what}")


def add_margin(box: Box, margin: float, rows: int, cols: int) -> Box:
    """Grow the box by `margin` (a fraction of its size) on every side, within the image."""
    dy, dx = int(round(box.height * margin)), int(round(box.width * margin))
    return Box(max(0, box.y0 - dy), max(0, box.x0 - dx), min(rows, box.y1 + dy),
               min(cols, box.x1 + dx), box.reason)


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
