"""Mutated DICOM files for the robustness tests: every mutation is derived from (seed, index),
so a failing file can be rebuilt exactly (`mutate(seed_file, seed, index)`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rsna_utils.dicom import uids

MUTATIONS = ("header_flip", "codestream_flip", "truncate", "huge_size", "lying_syntax",
             "fragment_overflow", "zero_block")
SYNTAXES = [uids.JPEG2000_LOSSLESS, uids.JPEG_LOSSLESS_SV1, uids.EXPLICIT_VR_LE, uids.RLE_LOSSLESS,
            uids.JPEG_EXTENDED, uids.JPEG_LS_LOSSLESS, uids.EXPLICIT_VR_BE, uids.IMPLICIT_VR_LE]
PIXEL_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = b"\xfe\xff\x00\xe0"


def mutate(data: bytes, seed: int, index: int) -> tuple[bytes, str]:
    """One mutant of `data` (a DICOM file's bytes) and the name of the mutation applied."""
    rng = np.random.default_rng([seed, index])
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    buf = bytearray(data)
    pix = data.rfind(PIXEL_TAG)
    pix = pix if pix > 0 else len(data) // 2
    if kind == "header_flip":
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(132, max(133, pix)))
            buf[i] ^= int(rng.integers(1, 256))
    elif kind == "codestream_flip":
        for _ in range(int(rng.integers(1, 32))):
            i = int(rng.integers(min(pix + 12, len(buf) - 1), len(buf)))
            buf[i] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == "zero_block":
        i = int(rng.integers(pix, len(buf)))
        buf[i:i + int(rng.integers(16, 4096))] = bytes(min(len(buf) - i, 4096))[: len(buf[i:i + 4096])]
    elif kind in ("huge_size", "lying_syntax"):
        from io import BytesIO

        import pydicom
        ds = pydicom.dcmread(BytesIO(data))
        if kind == "huge_size":
            ds.Rows, ds.Columns = int(rng.choice([60000, 65535, 1, 0])), int(rng.choice([60000, 65535, 2]))
        else:
            ds.file_meta.TransferSyntaxUID = str(rng.choice(SYNTAXES))
        out = BytesIO()
        try:
            ds.save_as(out, enforce_file_format=False)
            buf = bytearray(out.getvalue())
        except (ValueError, TypeError, AttributeError, NotImplementedError):
            # pydicom cannot write this combination: patch the UID bytes in place instead
            old = str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
            new = str(rng.choice([x for x in SYNTAXES if len(x) <= len(old)]))
            buf = bytearray(data.replace(old.encode(), new.encode().ljust(len(old), b"\0"), 1))
    elif kind == "fragment_overflow":
        first = data.find(ITEM_TAG, pix)
        second = data.find(ITEM_TAG, first + 8) if first >= 0 else -1
        at = second if second >= 0 and rng.random() < 0.7 else first
        if at >= 0:
            buf[at + 4:at + 8] = int(rng.choice([0xFFFFFF00, len(data) * 2, 7])).to_bytes(4, "little")
    return bytes(buf), kind


def write_mutants(seeds: list[Path], out_dir: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """n mutants spread over the seed files, written as out_dir/{patient}/{image}.dcm.
    Returns rows (patient_id, image_id, "mutation of <seed file>")."""
    blobs = [(p, p.read_bytes()) for p in seeds]
    rows = []
    for i in range(n):
        src, data = blobs[i % len(blobs)]
        mutant, kind = mutate(data, seed, i)
        pid, iid = str(90000 + i % 97), str(10_000_000 + i)
        d = out_dir / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{iid}.dcm").write_bytes(mutant)
        rows.append((pid, iid, f"{kind} of {src.name}"))
    return rows


def corrupt_codestream(data: bytes, seed: int = 0, frac: tuple[float, float] = (0.3, 0.7)) -> bytes:
    """`data` (a DICOM file with one compressed frame) with the middle of its codestream
    replaced by random bytes: the DICOM structure and the codestream header (SIZ / SOF) stay
    intact, so the file reaches the decoder, which must fail or return garbage for it alone."""
    rng = np.random.default_rng(seed)
    pix = data.rfind(PIXEL_TAG)
    start = data.find(ITEM_TAG, data.find(ITEM_TAG, pix) + 8)   # skip the offset table item
    if pix < 0 or start < 0:
        raise ValueError("not an encapsulated DICOM file")
    n = int.from_bytes(data[start + 4:start + 8], "little")
    a, b = start + 8 + int(n * frac[0]), start + 8 + int(n * frac[1])
    buf = bytearray(data)
    buf[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    return bytes(buf)
