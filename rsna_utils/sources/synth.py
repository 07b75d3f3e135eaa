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

import cv2
import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import (  # noqa: F401 - the columns' names here are kept for callers
    SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS, dicom_path, prediction_id)
from rsna_utils.dicom.uids import EXPLICIT_VR_LE, JPEG2000_LOSSLESS, JPEG_LOSSLESS_SV1, RLE_LOSSLESS

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


@dataclass(frozen=True)
class Machine:
    """One acquisition device: what it writes into every file it produces."""
    machine_id: int
    site_id: int
    weight: float                 # share of patients (train); test adds unseen machines
    full: tuple[int, int]         # Rows, Columns at --size full
    small: tuple[int, int]        # Rows, Columns at --size small
    manufacturer: str
    photometric: str = "MONOCHROME2"
    voi_function: str | None = None      # None: tag absent (LINEAR by default)
    n_windows: int = 1
    bits_stored: int = 12
    rescale: tuple[float, float] | None = None   # (slope, intercept) when written
    padding: bool = True                          # writes PixelPaddingValue
    modality_absent: float = 0.0                  # share of files without Modality


L_FULL, L_SMALL = (4096, 3328), (512, 416)
M_FULL, M_SMALL = (3328, 2560), (480, 368)
R_FULL, R_SMALL = (2776, 2082), (448, 336)
S_FULL, S_SMALL = (2294, 1914), (416, 348)

MACHINES = [
    Machine(49, 1, 0.43, L_FULL, L_SMALL, "HOLOGIC, Inc.", rescale=(1.0, 0.0)),
    Machine(48, 1, 0.10, L_FULL, L_SMALL, "HOLOGIC, Inc.", photometric="MONOCHROME1"),
    Machine(29, 1, 0.12, M_FULL, M_SMALL, "GE MEDICAL SYSTEMS", voi_function="SIGMOID",
            n_windows=3, padding=False),
    Machine(21, 2, 0.08, S_FULL, S_SMALL, "Philips", n_windows=2, modality_absent=0.5),
    Machine(93, 2, 0.07, R_FULL, R_SMALL, "FUJIFILM Corporation", photometric="MONOCHROME1",
            rescale=(1.0, 0.0)),
    Machine(210, 2, 0.10, S_FULL, S_SMALL, "GE HEALTHCARE", voi_function="SIGMOID"),
    Machine(216, 1, 0.04, R_FULL, R_SMALL, "SIEMENS", voi_function="LINEAR", padding=False),
    Machine(170, 2, 0.03, M_FULL, M_SMALL, "Planmed", modality_absent=1.0),
    Machine(190, 2, 0.02, S_FULL, S_SMALL, "IMS", padding=False),
    Machine(197, 1, 0.01, L_FULL, L_SMALL, "HOLOGIC, Inc.", bits_stored=16,
            rescale=(0.0625, 0.0)),
]
# Machines that appear only in the test set (the real test set has unseen machine_ids).
TEST_ONLY_MACHINES = [
    Machine(1070, 2, 0.08, M_FULL, M_SMALL, "FUJIFILM Corporation", padding=False),
]

ENCODING_SHARES = {"j2k": 0.47, "jpll": 0.47, "raw": 0.03, "rle": 0.03}
TRANSFER_SYNTAX = {"j2k": JPEG2000_LOSSLESS, "jpll": JPEG_LOSSLESS_SV1, "raw": EXPLICIT_VR_LE,
                   "rle": RLE_LOSSLESS}


class SynthError(RsnaError, ValueError):
    """A bad option given to the generator (shown to the user as one line)."""


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def _draw_patients(rng: np.random.Generator, n: int, machines: list[Machine],
                   positive_rate: float, used_ids: set[int]) -> list[dict]:
    weights = np.array([m.weight for m in machines], dtype=float)
    weights /= weights.sum()
    patients = []
    for _ in range(n):
        pid = int(rng.integers(5, 65535))
        while pid in used_ids:
            pid = int(rng.integers(5, 65535))
        used_ids.add(pid)
        machine = machines[int(rng.choice(len(machines), p=weights))]
        age = float(np.clip(np.round(rng.normal(58, 10)), 26, 89))
        if rng.random() < 0.004:
            age = float("nan")
        density = rng.choice(list("ABCD"), p=[0.11, 0.44, 0.40, 0.05])
        patients.append(dict(
            patient_id=pid, machine=machine, site_id=machine.site_id, age=age,
            implant=int(rng.random() < 0.014),
            density=None if machine.site_id == 2 else str(density),
            # A positive patient has cancer in one breast (the real data: both views positive).
            cancer_side=(("L", "R")[int(rng.integers(2))] if rng.random() < positive_rate
                         else None),
            lesion_kind=("mass" if rng.random() < 0.7 else "calc"),
            lesion_strength=float(rng.uniform(0.35, 1.0)),
            lesion_size=float(rng.uniform(0.6, 1.4)),
        ))
    return patients


def _draw_images(rng: np.random.Generator, patients: list[dict], used_ids: set[int]) -> list[dict]:
    rows = []
    for p in patients:
        views = [(lat, v) for lat in ("L", "R") for v in ("CC", "MLO")]
        if rng.random() < 0.06:  # a few patients with an extra view
            views.append((("L", "R")[int(rng.integers(2))],
                          str(rng.choice(["MLO", "CC", "AT", "LM", "ML", "LMO"],
                                         p=[0.4, 0.35, 0.1, 0.07, 0.05, 0.03]))))
        breast_birads = {}
        for lat in ("L", "R"):
            positive = p["cancer_side"] == lat
            if p["site_id"] == 2:
                birads = float("nan")
            elif positive:
                birads = 0.0
            else:
                birads = float(rng.choice([0, 1, 2], p=[0.12, 0.6, 0.28]))
            biopsy = int(positive or (birads == 0 and rng.random() < 0.25))
            breast_birads[lat] = dict(
                cancer=int(positive), BIRADS=birads, biopsy=biopsy,
                invasive=int(positive and rng.random() < 0.7),
                difficult_negative_case=bool(biopsy and not positive))
        for lat, view in views:
            iid = int(rng.integers(10_000, 2**31 - 1))
            while iid in used_ids:
                iid = int(rng.integers(10_000, 2**31 - 1))
            used_ids.add(iid)
            enc = str(rng.choice(list(ENCODING_SHARES), p=list(ENCODING_SHARES.values())))
            m: Machine = p["machine"]
            rows.append(dict(
                site_id=p["site_id"], patient_id=p["patient_id"], image_id=iid,
                laterality=lat, view=view, age=p["age"], implant=p["implant"],
                density=p["density"], machine_id=m.machine_id, **breast_birads[lat],
                encoding=enc, jp2=bool(rng.random() < 0.9),
                modality_absent=bool(rng.random() < m.modality_absent),
                # chest wall on the left for L, right for R; a few stored the other way
                chest_left=(lat == "L") ^ bool(rng.random() < 0.08),
                lesion_kind=p["lesion_kind"], lesion_strength=p["lesion_strength"],
                lesion_size=p["lesion_size"],
            ))
    return rows


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


def _machine(machine_id: int) -> Machine:
    for m in MACHINES + TEST_ONLY_MACHINES:
        if m.machine_id == machine_id:
            return m
    raise KeyError(machine_id)


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


def _uid(seed: int, *parts) -> str:
    from pydicom.uid import generate_uid
    return generate_uid(prefix="1.2.826.0.1.3680043.10.1337.", entropy_srcs=[str(seed)] + [str(p) for p in parts])


def encode_dicom(stored: np.ndarray, row: dict, window: tuple[list, list], seed: int):
    """Build the pydicom Dataset of one image (pixels encoded per the row's encoding)."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    m = _machine(row["machine_id"])
    ts = TRANSFER_SYNTAX[row["encoding"]]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", row["image_id"])
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, "study", row["patient_id"])
    ds.SeriesInstanceUID = _uid(seed, "series", row["image_id"])
    ds.PatientID = str(row["patient_id"])
    ds.InstanceNumber = 1
    if not row["modality_absent"]:
        ds.Modality = "MG"
    ds.Manufacturer = m.manufacturer
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = row["laterality"]
    ds.ViewPosition = row["view"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = m.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = m.bits_stored
    ds.HighBit = m.bits_stored - 1
    ds.PixelRepresentation = 0
    centers, widths = window
    ds.WindowCenter = centers if len(centers) > 1 else centers[0]
    ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    if len(centers) > 1:
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER", "SOFTER"][: len(centers)]
    if m.voi_function:
        ds.VOILUTFunction = m.voi_function
    if m.rescale:
        ds.RescaleSlope, ds.RescaleIntercept = m.rescale
        ds.RescaleType = "US"
    if m.padding:
        ds.PixelPaddingValue = (2 ** m.bits_stored - 1) if m.photometric == "MONOCHROME1" else 0
    ds.PixelSpacing = [0.07, 0.07]

    enc = row["encoding"]
    if enc == "raw":
        ds.PixelData = stored.astype("<u2").tobytes()
    elif enc == "rle":
        from pydicom.uid import RLELossless
        ds.compress(RLELossless, stored, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        if enc == "j2k":
            frame = imagecodecs.jpeg2k_encode(stored, level=0, reversible=True,
                                              codecformat="jp2" if row["jp2"] else "j2k",
                                              bitspersample=m.bits_stored, numthreads=1)
        else:
            frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1,
                                             bitspersample=m.bits_stored)
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds


def make_image(row: dict, size: str, seed: int, index: int):
    """Render, quantise and encode image number `index` of a plan: (stored, objects, dataset).

    `stored` is exactly what the DICOM file holds; tests decode the file and compare.
    """
    ss = np.random.SeedSequence([seed, index])
    img_seed, val_seed = ss.spawn(2)
    img, objects = render_image(row, size, img_seed)
    m = _machine(row["machine_id"])
    rng = np.random.default_rng(val_seed)
    stored = to_stored(img, m, rng)
    if m.padding:  # padded machines write the exact padding value outside the breast
        stored[img <= 0.02] = (2 ** m.bits_stored - 1) if m.photometric == "MONOCHROME1" else 0
    # the window from the tissue alone, as a vendor's window follows the breast: with the planted
    # lesions in, a bright mass stretched the window and darkened the whole image, so a cancer
    # could be read off the median brightness (image AUC 0.80-0.84 on seed 7) without finding
    # it. The lesions' own pixels are left out (not their boxes: a box also drops the tissue
    # around a mass, more of it on cancer images), and the burned-in markers.
    tissue = (img > 0.2) & ~objects.pop("lesion_pixels")
    for _, y0, x0, y1, x1 in objects["markers"]:
        tissue[y0:y1, x0:x1] = False
    ds = encode_dicom(stored, row, _window(stored, tissue, m, rng), seed)
    return stored, objects, ds


def _make_one(args) -> tuple[int, list]:
    row, size, seed, index, path = args
    _, objects, ds = make_image(row, size, seed, index)
    write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return index, [(row["image_id"],) + obj for obj in objects["lesions"]]


def plan_dataset(patients: int, seed: int, positive_rate: float,
                 test_patients: int) -> tuple[list[dict], list[dict]]:
    """Draw the train and test tables (one dict per image) from the seed."""
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    train_p = _draw_patients(rng, patients, MACHINES, positive_rate, used)
    test_p = _draw_patients(rng, test_patients, MACHINES + TEST_ONLY_MACHINES, positive_rate, used)
    used_img: set[int] = set()
    return _draw_images(rng, train_p, used_img), _draw_images(rng, test_p, used_img)


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


def synthesize(out: str | Path, patients: int = 200, seed: int = 0, positive_rate: float = 0.02,
               size: str = "small", test_patients: int | None = None, workers: int | None = None,
               progress: bool = True, overwrite: bool = False) -> dict:
    """Write an RSNA-shaped dataset under `out` and return a summary dict. A folder that
    already holds a dataset (a train.csv) is refused unless `overwrite`, which removes the
    dataset's files first (SYNTH_FILES, SYNTH_DIRS; nothing else in the folder).

    Files: train.csv, test.csv, sample_submission.csv (the Kaggle columns), test_labels.csv
    (the hidden answers for the synthetic test set, for scoring), lesions.csv (planted lesion
    boxes), train_images/{patient_id}/{image_id}.dcm and test_images/...
    """
    if not isinstance(patients, (int, np.integer)) or patients < 1:
        raise SynthError(f"--patients must be a positive integer, got {patients!r}")
    if not 0.0 <= positive_rate <= 1.0:
        raise SynthError(f"--positive-rate must be within [0, 1], got {positive_rate!r}")
    if size not in ("small", "full"):
        raise SynthError(f"--size must be 'small' or 'full', got {size!r}")
    if test_patients is None:
        test_patients = max(2, patients // 5)
    if test_patients < 0:
        raise SynthError(f"--test-patients must be >= 0, got {test_patients!r}")
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
