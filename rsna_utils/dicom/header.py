"""DICOM header: the fields the pipeline needs, parsed once with pydicom (without the pixel
data), and the checks that refuse a file before any decoder touches it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom import uids

# Decoding more pixels than this is refused before any decoder runs (a header can lie).
# The largest real mammograms are about 5,000 x 4,000 = 20 M pixels.
DEFAULT_MAX_PIXELS = 80_000_000


def transfer_syntax_name(uid: str) -> str:
    return uids.name(uid)


@dataclass
class VoiLut:
    """One item of the VOI LUT Sequence (PS3.3 C.11.2.1.1)."""
    first_mapped: int
    bits: int
    data: np.ndarray  # uint16 entries


@dataclass
class DicomHeader:
    """What the pipeline needs from a header. Missing tags keep their defaults (None / [])."""
    path: str
    transfer_syntax: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 0
    photometric: str = "MONOCHROME2"
    window_centers: list[float] = field(default_factory=list)
    window_widths: list[float] = field(default_factory=list)
    voi_function: str = "LINEAR"
    voi_luts: list[VoiLut] = field(default_factory=list)
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    pixel_padding_value: int | None = None
    laterality: str | None = None
    view: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    has_pixel_data: bool = True
    pixel_data_length: int | None = None     # bytes, for native (uncompressed) data
    # the lazily read pydicom dataset: the frame is cut from it without parsing the file again
    dataset: object = field(default=None, repr=False, compare=False)

    @property
    def signed(self) -> bool:
        return self.pixel_representation == 1

    @property
    def monochrome1(self) -> bool:
        return self.photometric == "MONOCHROME1"


def _floats(value) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return [float(v) for v in value]
    return [float(value)]


def _parse_voi_luts(ds) -> list[VoiLut]:
    luts = []
    for item in ds.get("VOILUTSequence") or []:
        desc = item.get("LUTDescriptor")
        if desc is None or "LUTData" not in item:
            continue
        n, first, bits = int(desc[0]) or 65536, int(desc[1]), int(desc[2])
        elem = item["LUTData"]
        if isinstance(elem.value, (bytes, bytearray)):
            data = np.frombuffer(elem.value, dtype="<u2")[:n]
        else:
            data = np.asarray(_floats(elem.value), dtype=np.uint16)[:n]
        luts.append(VoiLut(first_mapped=first, bits=bits, data=data.astype(np.uint16)))
    return luts


def read_header(path: str | Path, ds=None) -> DicomHeader:
    """Parse the header with pydicom, without reading the pixel data.

    Raises RsnaError naming the file when it is not a readable DICOM file. pydicom parses
    lazily and raises many types on damaged files (struct.error, BytesLengthException,
    NotImplementedError for an unknown VR...: all found by the fuzz test); they all mean the
    same to a user, so they become one clear error.
    """
    try:
        return _read_header(path, ds)
    except RsnaError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:
        raise RsnaError(f"{path}: not a readable DICOM file ({type(e).__name__}: "
                        f"{str(e)[:160]}); re-export or re-download it") from None


def _read_header(path: str | Path, ds=None) -> DicomHeader:
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(path)
    if ds is None:
        try:
            # defer_size: large values (PixelData) are not read, only their length noted
            ds = pydicom.dcmread(path, defer_size="512 KB")
        except FileNotFoundError:
            raise RsnaError(f"{path}: file not found; check --images and the CSV") from None
        except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError,
                IndexError, OverflowError) as e:
            raise RsnaError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}); "
                            "re-export or re-download it") from None
    try:
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.get(
            "file_meta", {}) else uids.IMPLICIT_VR_LE
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        pad = ds.get("PixelPaddingValue")
        h = DicomHeader(
            path=path,
            transfer_syntax=ts,
            rows=int(ds.get("Rows") or 0),
            columns=int(ds.get("Columns") or 0),
            frames=int(ds.get("NumberOfFrames") or 1),
            samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
            bits_allocated=int(ds.get("BitsAllocated") or 16),
            bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16),
            pixel_representation=int(ds.get("PixelRepresentation") or 0),
            photometric=str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip(),
            window_centers=_floats(ds.get("WindowCenter")),
            window_widths=_floats(ds.get("WindowWidth")),
            voi_function=str(ds.get("VOILUTFunction") or "LINEAR").strip().upper(),
            voi_luts=_parse_voi_luts(ds),
            rescale_slope=float(slope) if slope not in (None, "") else 1.0,
            rescale_intercept=float(intercept) if intercept not in (None, "") else 0.0,
            pixel_padding_value=int(pad) if isinstance(pad, (int, float)) else None,
            laterality=(ds.get("ImageLaterality") or ds.get("Laterality") or None),
            view=(ds.get("ViewPosition") or None),
            modality=(ds.get("Modality") or None),
            manufacturer=(ds.get("Manufacturer") or None),
            has_pixel_data="PixelData" in ds,
        )
        h.dataset = ds
        if h.has_pixel_data:
            raw = ds.get_item("PixelData")
            length = getattr(raw, "length", None)
            h.pixel_data_length = None if length in (None, 0xFFFFFFFF) else int(length)
            tell = getattr(raw, "value_tell", None)
            if h.pixel_data_length is not None and tell is not None:
                # a truncated file: fewer bytes left than PixelData declares (dicomsdl 0.109
                # reads past the end and segfaults on such files: found by the fuzz test)
                left = os.path.getsize(path) - int(tell)
                if left < h.pixel_data_length:
                    raise DecodeError(f"{path}: PixelData declares {h.pixel_data_length} bytes but "
                                      f"only {left} are in the file; the file is truncated")
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as e:
        raise RsnaError(f"{path}: unreadable header field ({type(e).__name__}: {e}); "
                        "the file is damaged") from None
    return h


def check_header(h: DicomHeader, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse what no backend should try to decode; raise DecodeError with the reason."""
    if not h.has_pixel_data:
        raise DecodeError(f"{h.path}: no PixelData element (absent, or the file is truncated); "
                          "nothing to decode")
    if h.rows <= 0 or h.columns <= 0:
        raise DecodeError(f"{h.path}: Rows={h.rows} Columns={h.columns} is not an image size")
    if h.rows * h.columns * h.samples_per_pixel > max_pixels:
        raise DecodeError(
            f"{h.path}: header declares {h.rows} x {h.columns} pixels, over the limit of "
            f"{max_pixels:,}; raise max_pixels (--max-pixels) if the file is genuine")
    if h.samples_per_pixel != 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(f"{h.path}: PhotometricInterpretation {h.photometric} with "
                          f"{h.samples_per_pixel} samples; only grayscale mammograms are supported")
    if h.bits_allocated not in (8, 16):
        raise DecodeError(f"{h.path}: BitsAllocated {h.bits_allocated} is not supported (8 or 16)")
    if not 1 <= h.bits_stored <= h.bits_allocated:
        raise DecodeError(f"{h.path}: BitsStored {h.bits_stored} must be 1..BitsAllocated "
                          f"({h.bits_allocated}); the header is damaged")
    if not (np.isfinite(h.rescale_slope) and np.isfinite(h.rescale_intercept)) or h.rescale_slope == 0:
        raise DecodeError(f"{h.path}: RescaleSlope {h.rescale_slope} / RescaleIntercept "
                          f"{h.rescale_intercept} are not usable; the header is damaged")
    if h.pixel_data_length is not None and h.transfer_syntax not in uids.CODESTREAM | {
            uids.RLE_LOSSLESS}:
        expected = h.rows * h.columns * h.frames * h.bits_allocated // 8
        if h.pixel_data_length not in (expected, expected + 1):
            raise DecodeError(
                f"{h.path}: PixelData holds {h.pixel_data_length} bytes but Rows x Columns x "
                f"frames ({h.rows} x {h.columns} x {h.frames}) needs {expected}; the header or "
                "the data is wrong")
