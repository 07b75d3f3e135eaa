"""Transfer syntax UIDs (PS3.5 Annex A / PS3.6 Annex A), spelled once for the whole package."""
from __future__ import annotations

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K = "1.2.840.10008.1.2.4.203"

NAMES = {
    IMPLICIT_VR_LE: "Implicit VR Little Endian",
    EXPLICIT_VR_LE: "Explicit VR Little Endian",
    EXPLICIT_VR_BE: "Explicit VR Big Endian",
    RLE_LOSSLESS: "RLE Lossless",
    JPEG_BASELINE: "JPEG Baseline",
    JPEG_EXTENDED: "JPEG Extended (12-bit)",
    JPEG_LOSSLESS: "JPEG Lossless",
    JPEG_LOSSLESS_SV1: "JPEG Lossless SV1",
    JPEG_LS_LOSSLESS: "JPEG-LS Lossless",
    JPEG_LS_NEAR_LOSSLESS: "JPEG-LS Near-Lossless",
    JPEG2000_LOSSLESS: "JPEG 2000 Lossless",
    JPEG2000: "JPEG 2000",
    HTJ2K_LOSSLESS: "HTJ2K Lossless",
    HTJ2K: "HTJ2K",
}

NATIVE = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, EXPLICIT_VR_BE})
J2K = frozenset({JPEG2000_LOSSLESS, JPEG2000})
JPEG_LOSSLESS_ALL = frozenset({JPEG_LOSSLESS, JPEG_LOSSLESS_SV1})
# frames that carry a JPEG / JPEG 2000 header with the image size (checked before decoding)
CODESTREAM = frozenset({JPEG_BASELINE, JPEG_EXTENDED}) | JPEG_LOSSLESS_ALL | J2K
# what the RSNA data uses (JPEG 2000 Lossless in JP2 containers, JPEG Lossless SV1): the syntaxes
# the cut-out-frame decoders (imagecodecs, nvImageCodec, DALI) take
FRAME_DECODABLE = JPEG_LOSSLESS_ALL | J2K


def name(uid: str) -> str:
    """'JPEG 2000 Lossless (1.2.840.10008.1.2.4.90)'."""
    return f"{NAMES.get(uid, 'unknown transfer syntax')} ({uid})"
