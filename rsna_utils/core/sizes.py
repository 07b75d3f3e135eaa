"""Image sizes, parsed in one place: `512`, `[h, w]`, `(h, w)` or `"HxW"` -> (height, width)."""
from __future__ import annotations

import argparse

from rsna_utils.core.errors import RsnaError

MIN_SIDE = 8           # a PNG side (preprocessing)
MIN_MODEL_SIDE = 32    # a model input side: the backbones downsample by 32


def parse_size(size, minimum: int = MIN_SIDE, name: str = "size") -> tuple[int, int]:
    """(height, width) from 512, [h, w], (h, w), "512" or "HxW"; RsnaError naming the value and
    what is wrong otherwise (not a number, three sides, a side below `minimum`)."""
    given = size
    hint = f"give 512 or HEIGHTxWIDTH such as 1024x512, each side >= {minimum}"
    if isinstance(size, str):
        parts = size.lower().replace(" ", "").split("x")
        if len(parts) > 2:
            raise RsnaError(f"{name}={given!r}: {len(parts)} sides; {hint}")
        size = parts
    if isinstance(size, bool):
        raise RsnaError(f"{name}={given!r}: not a size; {hint}")
    if isinstance(size, int):
        size = [size, size]
    try:
        sides = [int(v) for v in size]
        if any(float(v) != int(v) for v in size if not isinstance(v, str)):
            raise ValueError
    except (TypeError, ValueError):
        raise RsnaError(f"{name}={given!r}: not a whole number of pixels; {hint}") from None
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2:
        raise RsnaError(f"{name}={given!r}: {len(sides)} sides; {hint}")
    if min(sides) < minimum:
        raise RsnaError(f"{name}={given!r}: a side below {minimum} pixels; {hint}")
    return sides[0], sides[1]


def size_flag(minimum: int = MIN_SIDE):
    """An argparse `type` for a size flag: the parsed (height, width), or argparse's one-line
    error naming the value."""
    def size(text: str) -> tuple[int, int]:
        try:
            return parse_size(text, minimum, "size")
        except RsnaError as e:
            raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None
    return size
