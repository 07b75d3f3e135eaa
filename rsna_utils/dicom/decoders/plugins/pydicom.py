"""pydicom's `pixel_array`, through its own plugins (pylibjpeg-libjpeg, -openjpeg, -rle): every
syntax those plugins take, the last resort of `auto`."""
from __future__ import annotations

import importlib.util

import numpy as np

from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom import uids

NAME = "pydicom"
SYNTAXES = frozenset(uids.NAMES)
PACKAGES = "pydicom with pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle"
DEVICE = "cpu"
ORDER = 90                 # the last resort of `auto`


def why_unavailable() -> str | None:
    return None if importlib.util.find_spec("pydicom") else "No module named 'pydicom'"


def is_available() -> bool:
    return why_unavailable() is None


def decode(path: str, h) -> np.ndarray:
    import pydicom
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # plugins raise many types; pylibjpeg-rle (Rust) panics with a
        # pyo3 PanicException, which derives from BaseException (found by the fuzz test)
        raise DecodeError(f"pydicom: {type(e).__name__}: {str(e).strip()[:200]}") from None
    return arr
