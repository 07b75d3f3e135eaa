"""imagecodecs on the cut-out frame: the fastest CPU decoder for JPEG Lossless here (64 vs 84 ms
for dicomsdl on a 4096 x 3328 image; BENCHMARKS.md), on par for JPEG 2000."""
from __future__ import annotations

import importlib.util

import numpy as np

from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom import uids

NAME = "imagecodecs"
SYNTAXES = uids.FRAME_DECODABLE
PACKAGES = "imagecodecs"
DEVICE = "cpu"
ORDER = 10


def why_unavailable() -> str | None:
    return None if importlib.util.find_spec("imagecodecs") else "No module named 'imagecodecs'"


def is_available() -> bool:
    return why_unavailable() is None


def decode(path: str, h) -> np.ndarray:
    import imagecodecs

    from rsna_utils.dicom.frames import first_frame
    frame = first_frame(path, h.dataset)
    try:
        if h.transfer_syntax in uids.J2K:
            return imagecodecs.jpeg2k_decode(frame, numthreads=1)
        return imagecodecs.jpeg8_decode(frame)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # imagecodecs raises its own *Error types per codec
        raise DecodeError(f"imagecodecs: {type(e).__name__}: {str(e).strip()[:200]}") from None
