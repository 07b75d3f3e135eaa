"""Read a DICOM file: header fields the pipeline needs, and the stored pixel values.

The header is always parsed with pydicom, without the pixel data (`rsna_utils.dicom.header`), so every
decoder sees the same fields; the pixels come from the decoder plug-ins of
`rsna_utils.dicom.decoders` (imagecodecs, dicomsdl, pydicom on the CPU; nvImageCodec, DALI on a GPU),
chosen by name from a `DecoderSet` found once. Header checks run before any decoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom import uids
from rsna_utils.dicom.decoders import registry
from rsna_utils.dicom.header import DEFAULT_MAX_PIXELS, DicomHeader, check_header, read_header


@dataclass
class DicomImage:
    pixels: np.ndarray          # stored values, (rows, columns), uint16 or int16
    header: DicomHeader
    backend: str


def _check_pixels(arr: np.ndarray, h: DicomHeader) -> np.ndarray:
    if arr.ndim == 3 and h.frames > 1:
        arr = arr[0]
    if arr.shape != (h.rows, h.columns):
        raise DecodeError(f"{h.path}: decoded shape {arr.shape} differs from Rows x Columns "
                          f"{h.rows} x {h.columns}; the header or the data is wrong")
    if arr.dtype not in (np.uint16, np.int16):
        arr = arr.astype(np.int16 if h.signed else np.uint16)
    return arr


def check_frame(h: DicomHeader) -> None:
    """Checks of the compressed frame that must pass before a decoder allocates or parses."""
    from rsna_utils.dicom.frames import check_codestream, check_rle_header
    if h.transfer_syntax in uids.CODESTREAM:
        # A decoder trusts Rows/Columns and allocates for them: check the codestream first.
        check_codestream(h.path, h.rows, h.columns, ds=h.dataset, transfer_syntax=h.transfer_syntax)
    if h.transfer_syntax == uids.RLE_LOSSLESS:
        check_rle_header(h.path, h.bits_allocated, h.samples_per_pixel, ds=h.dataset)


def decode_pixels(h: DicomHeader, backend: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                  decoders: registry.DecoderSet | None = None) -> tuple[np.ndarray, str]:
    """Decode the stored values of the first frame; returns (array, backend used). `decoders`:
    the run's `registry.DecoderSet` (default: the one of this process)."""
    check_header(h, max_pixels)
    decoders = decoders or registry.default_set()
    order = decoders.candidates(h.transfer_syntax, backend)    # a bad name fails before I/O
    if not order:
        decoders.decode(h, backend)       # raises the error that lists what is installed
    check_frame(h)
    return decoders.decode(h, backend, check=lambda arr: _check_pixels(arr, h))


def check_dicom_folder(images: str | Path) -> Path:
    """The folder of {patient_id}/{image_id}.dcm, or one line naming it and the fix: a typo in
    the path must stop a run before it writes anything, not turn every image into a failure."""
    images = Path(images)
    if not images.is_dir():
        raise RsnaError(f"{images}: images folder not found; pass the folder that holds "
                        "{patient_id}/{image_id}.dcm (e.g. train_images or test_images)")
    return images


def check_listed_files(images: str | Path, paths: list[str], csv=None) -> None:
    """At least one of the files a CSV lists under `images` is there, or one line saying none
    is (a CSV of another folder, or --images one level off), before anything is written. Stops
    at the first file found: one stat on a good folder."""
    paths = [p for p in paths if p]
    if paths and not any(os.path.exists(p) for p in paths):
        listed = f"{Path(csv).name} lists" if csv is not None else "listed"
        raise RsnaError(f"none of the {len(paths)} files {listed} exist under {images} (e.g. "
                        f"{paths[0]}): wrong --images?")


def read_dicom(path: str | Path, backend: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
               decoders: registry.DecoderSet | None = None) -> DicomImage:
    """Read one DICOM file: stored pixel values (first frame) and the header fields.

    backend: "auto" (imagecodecs for JPEG / JPEG 2000, then dicomsdl, then pydicom),
    "imagecodecs", "dicomsdl", "pydicom", or a GPU decoder ("nvimgcodec", "dali"; for many
    files, `rsna_utils.image.gpu` decodes in batches). `decoders`: a `registry.DecoderSet`
    found once for many files (default: the one of this process).
    """
    h = read_header(path)
    arr, used = decode_pixels(h, backend, max_pixels, decoders)
    return DicomImage(arr, h, used)
