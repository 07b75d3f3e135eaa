"""The synthetic generator's pixels: one mammogram drawn as displayed brightness (breast
outline, pectoral muscle, texture, planted lesions, implants, devices, burned-in markers), then
mapped to the stored values and given its windows."""
from __future__ import annotations

import cv2
import numpy as np

from rsna_utils.sources.synth_machines import Machine, _machine


# ----------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    a = rng.standard_normal(shape).astype(np.float32)
    a = cv2.GaussianBlur(a, (0, 0), sigma)
    return a / (a.std() + 1e-6)


def _blob(h: int, w: int, cy: float, cx: float, r: float, rng: np.random.Generator,
          irregular: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A soft blob with an irregular (spiculated when irregular>0) border, in a local patch."""
    R = int(np.ceil(r * 1.6)) + 2
    cy, cx = float(np.clip(cy, 0, h - 1)), float(np.clip(cx, 0, w - 1))
    y0, y1 = max(0, int(cy) - R), min(h, int(cy) + R + 1)
    x0, x1 = max(0, int(cx) - R), min(w, int(cx) + R + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, r)
    for k in (3, 5, 9, 15):
        radius *= 1 + irregular * 0.12 * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    d = np.sqrt(dy * dy + dx * dx) / radius
    prof = np.clip(1.0 - d * d, 0, 1) ** 0.7
    return prof.astype(np.float32), (y0, y1, x0, x1)


def _draw_glyphs(img: np.ndarray, rng: np.random.Generator, y: int, x: int, cell: int,
                 n: int, value: float) -> tuple[int, int, int, int]:
    """Burned-in text: n 5x7 random glyphs (bright pixels) starting at (y, x)."""
    h, w = img.shape
    for i in range(n):
        glyph = rng.random((7, 5)) < 0.45
        g = np.kron(glyph, np.ones((cell, cell), bool))
        gy, gx = y, x + i * 6 * cell
        gh, gw = min(g.shape[0], h - gy), min(g.shape[1], w - gx)
        if gh > 0 and gw > 0 and gy >= 0 and gx >= 0:
            img[gy:gy + gh, gx:gx + gw][g[:gh, :gw]] = value
    return y, x, y + 7 * cell, x + n * 6 * cell


def render_image(row: dict, size: str, seed_seq: np.random.SeedSequence) -> tuple[np.ndarray, dict]:
    """Render one mammogram as float32 "displayed brightness" in [0, 1] (1 = dense/bright).

    Returns the image and a dict with the planted objects (lesion boxes, marker boxes) in pixel
    coordinates of the returned image, for tests and for `lesions.csv`.
    """
    rng = np.random.default_rng(seed_seq)
    m = _machine(row["machine_id"])
    H, W = m.full if size == "full" else m.small
    s = 4 if size == "full" else 1          # build the anatomy at a reduced grid, then upsample
    h, w = H // s, W // s
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xw = xx if row["chest_left"] else (w - 1 - xx)       # distance from the chest wall
    mlo = row["view"] in ("MLO", "ML", "LMO", "LM")
    cy = h * rng.uniform(0.45, 0.55) if not mlo else h * rng.uniform(0.50, 0.60)
    ay = h * (rng.uniform(0.36, 0.46) if not mlo else rng.uniform(0.46, 0.56))
    ax = w * rng.uniform(0.55, 0.80)
    # skin line wobble so the outline is not a perfect ellipse
    wob = 1 + 0.04 * np.sin(yy / h * rng.uniform(4, 9) + rng.uniform(0, 6))
    inside = ((yy - cy) / ay) ** 2 + (xw / (ax * wob)) ** 2 <= 1.0
    if mlo:  # the pectoral muscle: a bright triangle along the chest wall at the top
        inside |= (xw / (w * rng.uniform(0.25, 0.4)) + yy / (h * rng.uniform(0.35, 0.55))) < 1
    mask = inside.astype(np.uint8)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    thickness = 1 - np.exp(-dist / (0.06 * w))
    density = {"A": 0.15, "B": 0.3, "C": 0.45, "D": 0.6}.get(row["density"] or "B", 0.3)
    texture = (0.55 * _smooth_noise(rng, (h, w), w * 0.012)
               + 0.35 * _smooth_noise(rng, (h, w), w * 0.035)
               + 0.25 * _smooth_noise(rng, (h, w), w * 0.09))
    glandular = np.clip(density + 0.12 * texture, 0, 1)
    tissue = (0.35 + 0.40 * thickness * (0.6 + 0.6 * glandular)) * mask
    if mlo:
        pect = (xw / (w * 0.3) + yy / (h * 0.45)) < 1
        tissue[pect] = np.maximum(tissue[pect], 0.62 + 0.04 * texture[pect])
    img = cv2.resize(tissue.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    full_mask = cv2.resize(mask, (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    full_dist = cv2.resize(dist, (W, H), interpolation=cv2.INTER_LINEAR) * s

    ys_, xs_ = np.nonzero(full_mask.any(axis=1))[0], np.nonzero(full_mask.any(axis=0))[0]
    objects: dict = {"lesions": [], "markers": [],
                     "breast_box": (int(ys_[0]), int(xs_[0]), int(ys_[-1]) + 1, int(xs_[-1]) + 1),
                     "lesion_pixels": np.zeros((H, W), bool)}   # every planted blob's own pixels

    def point_inside(margin: float) -> tuple[float, float] | None:
        ys, xs = np.nonzero(full_dist > margin)
        if len(ys) == 0:
            return None
        i = int(rng.integers(len(ys)))
        return float(ys[i]), float(xs[i])

    def add_mass(r: float, contrast: float, irregular: float, kind: str):
        pt = point_inside(r * 1.8)
        if pt is None:
            return
        prof, (y0, y1, x0, x1) = _blob(H, W, pt[0], pt[1], r, rng, irregular)
        img[y0:y1, x0:x1] += contrast * prof
        objects["lesion_pixels"][y0:y1, x0:x1] |= prof > 0
        objects["lesions"].append((kind, y0, x0, y1, x1))

    # benign-looking round structures on any breast, so the task is not "find any blob"
    for _ in range(int(rng.poisson(0.8))):
        add_mass(W * rng.uniform(0.015, 0.04), rng.uniform(0.03, 0.08), 0.0, "benign")
    if row["cancer"]:
        scale = row["lesion_size"]
        if row["lesion_kind"] == "mass":
            add_mass(W * 0.06 * scale, 0.07 + 0.10 * row["lesion_strength"], 1.0, "mass")
        else:
            r_cluster = W * 0.05 * scale
            pt = point_inside(r_cluster * 1.5)
            if pt is not None:
                n = int(rng.integers(8, 20))
                r_dot = max(1.2, W * 0.008)
                ys, xs = [], []
                for _ in range(n):
                    dy, dx = rng.normal(0, r_cluster / 2, 2)
                    prof, (y0, y1, x0, x1) = _blob(H, W, pt[0] + dy, pt[1] + dx,
                                                   r_dot * rng.uniform(0.7, 1.3), rng, 0.0)
                    img[y0:y1, x0:x1] += (0.12 + 0.15 * row["lesion_strength"]) * prof
                    objects["lesion_pixels"][y0:y1, x0:x1] |= prof > 0
                    ys += [y0, y1]
                    xs += [x0, x1]
                objects["lesions"].append(("calc", min(ys), min(xs), max(ys), max(xs)))
    if row["implant"] and row["view"] in ("CC", "MLO"):
        pt_y = H * rng.uniform(0.4, 0.6)
        r = W * 0.18
        cx = r * 0.9 if row["chest_left"] else W - r * 0.9
        prof, (y0, y1, x0, x1) = _blob(H, W, pt_y, cx, r, rng, 0.0)
        img[y0:y1, x0:x1] = np.maximum(img[y0:y1, x0:x1], 0.97 * (prof > 0.05))
    if rng.random() < 0.02:  # pacemaker-like object, upper part, may overlap the breast
        y, x = int(H * rng.uniform(0.02, 0.15)), int(W * rng.uniform(0.1, 0.6))
        hh, ww = int(H * 0.05), int(W * 0.09)
        img[y:y + hh, x:x + ww] = 0.99
        cv2.line(img, (x + ww // 2, y + hh), (x + ww, min(H - 1, y + hh * 4)), 0.99,
                 max(1, W // 300))
        objects["markers"].append(("device", y, x, y + hh, x + ww))

    img += 0.006 * rng.standard_normal(img.shape).astype(np.float32) * full_mask   # quantum noise
    # background: faint noise, not exactly zero on most machines
    img[~full_mask] = np.abs(0.004 * rng.standard_normal(int((~full_mask).sum()))).astype(np.float32)
    # burned-in markers on the side away from the chest wall, some touching the border
    cell = max(1, W // 260)
    for corner in range(int(rng.integers(1, 3))):
        n = int(rng.integers(2, 6))
        bw = n * 6 * cell
        touch = rng.random() < 0.3
        off = 0 if touch else int(W * rng.uniform(0.01, 0.04))
        y = off if corner == 0 else H - 7 * cell - off
        x = W - bw - off if row["chest_left"] else off
        box = _draw_glyphs(img, rng, y, max(0, x), cell, n, 1.0)
        objects["markers"].append(("text",) + box)
    return np.clip(img, 0, 1), objects


def to_stored(img: np.ndarray, m: Machine, rng: np.random.Generator) -> np.ndarray:
    """Map brightness [0, 1] to stored values: BitsStored range, MONOCHROME1 inverted."""
    top = 2 ** m.bits_stored - 1
    gain = rng.uniform(0.80, 0.98)
    v = img * (top * gain)
    if m.photometric == "MONOCHROME1":
        v = top - v
    return np.clip(np.rint(v), 0, top).astype(np.uint16)


def _window(stored: np.ndarray, mask: np.ndarray, m: Machine, rng) -> tuple[list, list]:
    slope, intercept = m.rescale or (1.0, 0.0)
    vals = stored[mask].astype(np.float64) * slope + intercept
    lo, hi = np.percentile(vals, [1, 99.5]) if vals.size else (0.0, 2.0 ** m.bits_stored)
    c = (lo + hi) / 2
    wdt = max(2.0, (hi - lo) * rng.uniform(1.0, 1.25))
    centers = [c, c + 0.05 * wdt, c][: m.n_windows]
    widths = [wdt, wdt * 0.8, wdt * 1.3][: m.n_windows]
    return [round(float(x), 1) for x in centers], [round(float(x), 1) for x in widths]
