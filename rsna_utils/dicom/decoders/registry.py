"""The decoder registry: plug-ins looked up by name, never by branching on their names.

Each decoder is a module of this package with NAME, SYNTAXES (the transfer syntaxes it takes),
PACKAGES (what to install for it), DEVICE ("cpu" or "gpu"), `is_available()` (it checks its own
packages) and `decode(path, header) -> stored values`; a GPU plug-in also has `BatchDecoder`
(many frames at once, `gpu_batch`). The registry tries, in order, the available decoders that
take the file's syntax; a decoder whose package is missing is skipped, and when nothing decodes
a file the error lists what was tried, what is installed and what would decode it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom import uids

CPU_ORDER = ("imagecodecs", "dicomsdl", "pydicom")       # the `auto` order on the CPU
GPU_NAMES = ("nvimgcodec", "dali")
ALL = CPU_ORDER + GPU_NAMES

# What decodes a syntax, including packages this project does not use: named in the error
# when nothing installed could.
WOULD_DECODE = {
    uids.RLE_LOSSLESS: "pylibjpeg-rle or dicomsdl",
    uids.JPEG_BASELINE: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_EXTENDED: "pylibjpeg-libjpeg, python-gdcm or dicomsdl",
    uids.JPEG_LOSSLESS: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_LOSSLESS_SV1: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_LS_LOSSLESS: "pyjpegls, python-gdcm or dicomsdl",
    uids.JPEG_LS_NEAR_LOSSLESS: "pyjpegls, python-gdcm or dicomsdl",
    uids.JPEG2000_LOSSLESS: "pylibjpeg-openjpeg or dicomsdl",
    uids.JPEG2000: "pylibjpeg-openjpeg or dicomsdl",
    uids.HTJ2K_LOSSLESS: "pylibjpeg-openjpeg",
    uids.HTJ2K: "pylibjpeg-openjpeg",
}


def get(name: str) -> ModuleType:
    if name not in ALL:
        raise RsnaError(f"unknown backend {name!r}; choose one of "
                        f"{', '.join(['auto', *CPU_ORDER])} (GPU: {', '.join(GPU_NAMES)})")
    return importlib.import_module(f"rsna_utils.dicom.decoders.{name}")


def candidates(syntax: str, backend: str = "auto") -> list[str]:
    """The CPU decoders to try for `syntax`, in order (`auto`), or the one asked for. Raises
    RsnaError when the one asked for is not installed; one that does not take the syntax is
    returned all the same (`decode` then names it as not taking it)."""
    if backend == "auto":
        return [n for n in CPU_ORDER if syntax in get(n).SYNTAXES and get(n).is_available()]
    mod = get(backend)
    if not mod.is_available():
        raise RsnaError(f"backend {backend!r} is not installed; pip install {mod.PACKAGES}")
    return [backend]


def decode(h, backend: str = "auto", check=None) -> tuple[np.ndarray, str]:
    """The first frame's stored values from the first decoder that succeeds; returns
    (array, decoder name). `check(array) -> array` validates each decoder's output (a wrong
    shape raises DecodeError, and the next decoder is tried). DecodeError naming everything
    tried when none succeeds."""
    order = candidates(h.transfer_syntax, backend)
    errors = []
    for name in order:
        mod = get(name)
        if h.transfer_syntax not in mod.SYNTAXES:
            errors.append(f"{name}: does not take {uids.name(h.transfer_syntax)}")
            continue
        try:
            arr = mod.decode(h.path, h)
            return (check(arr) if check else arr), name
        except DecodeError as e:
            errors.append(str(e))
        except MemoryError:
            errors.append(f"{name}: out of memory")
    have = [n for n in CPU_ORDER if get(n).is_available()]
    hint = (" (if installed, the data is likely corrupt)" if backend == "auto"
            or get(backend).DEVICE == "cpu" else "")
    raise DecodeError(
        f"{h.path}: cannot decode {uids.name(h.transfer_syntax)} pixel data; tried "
        f"{', '.join(order) or 'nothing (no installed decoder takes it)'}; installed: "
        f"{', '.join(have) or 'none'}; it decodes with "
        f"{WOULD_DECODE.get(h.transfer_syntax, 'a decoder for this transfer syntax')}"
        f"{hint} [{'; '.join(errors)}]")
