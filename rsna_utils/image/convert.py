"""DICOM -> windowed, cropped, resized image: the settings (`PreprocessConfig`), the per-image
kernel (`preprocess_image`) and the PNG writer (`write_png`). A whole folder is
`rsna_utils.image.preprocess.Preprocessor` (CPU) or `rsna_utils.image.gpu` (GPU).

Order of work per image, chosen for speed (see BENCHMARKS.md): decode; subsample the stored
values (every k-th pixel); plan the image from the header and the subsample (window and lookup
table, breast box, flip, geometry: `rsna_utils.image.plan`, shared with the GPU path); cut the
box out of the full-resolution stored values; area-resize the crop; window the small result.
Windowing after the area resize costs a few hundredths of a gray level on average against
windowing first (`window_first=True` does that, at about 20 ms more per large image).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from rsna_utils.core.config import Config, setting
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.sizes import MIN_SIDE, parse_size, size_flag
from rsna_utils.dicom.header import DEFAULT_MAX_PIXELS, read_header
from rsna_utils.dicom.reader import decode_pixels
from rsna_utils.image import roi
from rsna_utils.image.plan import PreprocessError, apply_numpy, make_plan


@dataclass
class PreprocessConfig(Config):
    """Everything that decides the output pixels: the `rsna preprocess` flags, notebook 02's
    parameters and the plans derive from these fields. Saved as preprocess.json beside the PNGs
    and in every checkpoint (inference reuses it)."""

    KIND = "preprocessing"

    size: tuple | list | int | str = setting(
        (512, 512), "output size: 512 or HEIGHTxWIDTH, e.g. 1024x512 (2:1 like the breast crop)",
        parse=size_flag())
    resize_mode: str = setting("pad", "pad: keep the crop's aspect ratio, black background; "
                               "stretch", choices=("stretch", "pad"))
    bits: int = setting(8, "PNG bit depth", choices=(8, 16))
    margin: float = setting(0.0, "grow the ROI box by this fraction on each side", ge=0)
    flip: str = setting("mass", "mirror so the chest wall is on the left: by pixel mass, by the "
                        "laterality tag, or none", choices=("none", "mass", "laterality"))
    window_index: int = setting(0, "which window / VOI LUT when a file has several", ge=0)
    prefer_lut: bool = setting(True, "a VOI LUT Sequence wins over the window (as pydicom)")
    window_first: bool = setting(False, "window at full resolution before resizing (slower)")
    roi_max_side: int = setting(512, "the breast ROI is found on a subsample this size", ge=16)
    crop: bool = setting(True, "crop to the breast ROI")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse headers declaring more pixels than "
                              "this", ge=1)
    inverted: str = setting("warn", "images white at their edges after windowing (a negative: "
                            "pixels that contradict their PhotometricInterpretation): warn (listed "
                            "in meta.csv and the summary) or fix (invert them)",
                            choices=("warn", "fix"))

    def __post_init__(self):
        self.size = parse_size(self.size, MIN_SIDE)
        if self.bits not in (8, 16):
            raise RsnaError(f"bits {self.bits}: PNG output is 8 or 16 bits")
        if self.resize_mode not in ("stretch", "pad"):
            raise RsnaError(f"resize_mode {self.resize_mode!r}: choose stretch or pad")
        if self.inverted not in ("warn", "fix"):
            raise RsnaError(f"inverted {self.inverted!r}: choose warn (keep the pixels, list the "
                            "image) or fix (invert images that are white at their edges)")
        if self.flip not in ("none", "mass", "laterality"):
            raise RsnaError(f"flip {self.flip!r}: choose none, mass or laterality")
        self.check_fields()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def preprocess_image(path: str | Path, cfg: PreprocessConfig, backend: str = "auto",
                     pixels: np.ndarray | None = None, header=None,
                     decoders=None) -> tuple[np.ndarray, dict]:
    """One DICOM file to one output image (uint8 or uint16, shape cfg.size) and its metadata.

    `pixels`/`header` may be given when decoded elsewhere. `decoders`: the run's
    `DecoderSet` (default: the one of this process).
    Raises RsnaError (DecodeError, PreprocessError) for files that cannot be used.
    """
    t0 = time.perf_counter()
    h = header or read_header(path)
    used = backend
    if pixels is None:
        pixels, used = decode_pixels(h, backend, cfg.max_pixels, decoders)
    t_dec = time.perf_counter()
    small = roi.subsample(pixels, cfg.roi_max_side)
    plan = make_plan(h, small, cfg, pixels.shape, lambda: pixels.min() == pixels.max())
    out = apply_numpy(pixels, plan)
    t1 = time.perf_counter()
    meta = dict(plan.meta(h), backend=used, decode_ms=round((t_dec - t0) * 1e3, 2),
                total_ms=round((t1 - t0) * 1e3, 2))
    return out, meta


def write_png(path: str | Path, img: np.ndarray, compression: int = 1) -> None:
    """Write atomically: a killed run never leaves a half-written PNG under the final name.

    zlib level 1, RLE strategy, SUB filter only: 2.1 ms for 512x512 against 3.6 ms for
    OpenCV's default (adaptive filters), with files about the same size (BENCHMARKS.md).
    """
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, compression,
                                         cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                                         cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB])
    if not ok:
        raise PreprocessError(f"{path}: PNG encoding failed")
    write_atomic(path, buf.tobytes(), PNG_SPACE_FIX, doing="writing the PNG")


PNG_SPACE_FIX = ("Free some space, or give --out a folder on a larger disk, and run the same "
                 "command again: the images already written are kept and skipped")


# settings added after PNG folders and checkpoints were already written, with the value that
# gives the pixels those older runs made: a setting absent from a stored config means this
LATER_SETTINGS = {"inverted": "warn"}


def with_later_settings(pre: dict) -> dict:
    """A stored preprocessing config (preprocess.json, a checkpoint's) completed with the
    settings it predates, so that comparing it with today's config compares pixels."""
    return {**LATER_SETTINGS, **pre} if pre else pre
