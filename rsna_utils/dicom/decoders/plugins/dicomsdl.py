"""dicomsdl (C++): reads the file and decodes native, RLE, JPEG, JPEG-LS and JPEG 2000 data."""
from __future__ import annotations

import importlib.util

import numpy as np

from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom import uids

NAME = "dicomsdl"
SYNTAXES = frozenset(uids.NAMES) - {uids.HTJ2K_LOSSLESS, uids.HTJ2K}
PACKAGES = "dicomsdl"
DEVICE = "cpu"
ORDER = 20


def why_unavailable() -> str | None:
    return None if importlib.util.find_spec("dicomsdl") else "No module named 'dicomsdl'"


def is_available() -> bool:
    return why_unavailable() is None


def decode(path: str, h) -> np.ndarray:
    import dicomsdl
    try:
        dset = dicomsdl.open(path)
        arr = dset.pixelData(index=0, storedvalue=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # dicomsdl raises RuntimeError/its own types from C++
        raise DecodeError(f"dicomsdl: {type(e).__name__}: {str(e).strip()[:200]}") from None
    if arr is None:
        raise DecodeError("dicomsdl: returned no pixels")
    return arr
