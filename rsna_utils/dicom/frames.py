"""Cut the compressed frame out of a DICOM file and read its codestream header.

GPU decoders take the JPEG 2000 or JPEG bytes themselves, not the DICOM file; and a header
that lies (Rows/Columns that disagree with the codestream) must be caught before a decoder
allocates for it. Encapsulation: PS3.5 A.4 (Basic Offset Table, then one item per fragment).
"""
from __future__ import annotations

from dataclasses import dataclass

from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom import uids

JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JPEG_SOI = b"\xff\xd8"


@dataclass(frozen=True)
class Codestream:
    kind: str           # "jp2", "j2k" or "jpeg"
    rows: int
    columns: int
    precision: int      # bits per sample written in the codestream (SIZ / SOF)
    components: int
    signed: bool = False
    sof: int = 0        # JPEG: the SOF marker (0xC3 = lossless Huffman)


_LAST: tuple = ("", 0.0, b"")   # (path, mtime, frame): the check and the decode read once


def first_frame(path: str, ds=None) -> bytes:
    """The first frame's compressed bytes (fragments joined) of an encapsulated file."""
    import os

    global _LAST
    if ds is None:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = -1
        if _LAST[0] == str(path) and _LAST[1] == mtime:
            return _LAST[2]
        frame = _first_frame(path, None)
        _LAST = (str(path), mtime, frame)
        return frame
    return _first_frame(path, ds)


def _first_frame(path: str, ds) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # pydicom raises many types on damaged files
            raise DecodeError(f"{path}: cannot read the file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise DecodeError(f"{path}: no PixelData element; nothing to decode")
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        raise DecodeError(f"{path}: pixel data is not encapsulated "
                          f"({ds.file_meta.TransferSyntaxUID}); no codestream to cut out")
    n = int(ds.get("NumberOfFrames") or 1)
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=n))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # StopIteration, ValueError, struct.error, ... on damaged data
        raise DecodeError(f"{path}: broken encapsulated pixel data ({type(e).__name__}: {str(e)[:160]})") from None


def _j2k_codestream(data: bytes) -> bytes:
    """The raw J2K codestream: itself, or the contents of the JP2 'jp2c' box."""
    if data.startswith(J2K_SOC_SIZ):
        return data
    if not data.startswith(JP2_SIGNATURE):
        raise DecodeError("not a JPEG 2000 codestream or JP2 file")
    pos = 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        box = data[pos + 4:pos + 8]
        head = 8
        if length == 1:
            length = int.from_bytes(data[pos + 8:pos + 16], "big")
            head = 16
        elif length == 0:
            length = len(data) - pos
        if length < head:
            raise DecodeError(f"JP2 box {box!r} has a bad length {length}")
        if box == b"jp2c":
            return data[pos + head:pos + length]
        pos += length
    raise DecodeError("JP2 file without a codestream box (jp2c)")


def parse_codestream(data: bytes) -> Codestream:
    """Read size and precision from a J2K SIZ segment or a JPEG SOF segment."""
    if data.startswith(JP2_SIGNATURE) or data.startswith(J2K_SOC_SIZ):
        kind = "jp2" if data.startswith(JP2_SIGNATURE) else "j2k"
        cs = _j2k_codestream(data)
        if not cs.startswith(J2K_SOC_SIZ) or len(cs) < 4 + 38 + 3:
            raise DecodeError("JPEG 2000 codestream without a SIZ segment")
        s = cs[4:]
        xsiz, ysiz, xo, yo = (int.from_bytes(s[i:i + 4], "big") for i in (4, 8, 12, 16))
        csiz = int.from_bytes(s[36:38], "big")
        ssiz = s[38]
        if xsiz <= xo or ysiz <= yo or csiz < 1:
            raise DecodeError(f"JPEG 2000 SIZ segment gives an empty image ({xsiz}x{ysiz})")
        return Codestream(kind, ysiz - yo, xsiz - xo, (ssiz & 0x7F) + 1, csiz, bool(ssiz & 0x80))
    if data.startswith(JPEG_SOI):
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                raise DecodeError(f"JPEG stream: expected a marker at byte {pos}")
            marker = data[pos + 1]
            if marker == 0xFF:          # fill byte
                pos += 1
                continue
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF):
                seg = data[pos + 4:pos + 2 + length]
                if len(seg) < 6:
                    raise DecodeError("JPEG SOF segment is truncated")
                return Codestream("jpeg", int.from_bytes(seg[1:3], "big"),
                                  int.from_bytes(seg[3:5], "big"), seg[0], seg[5], False, marker)
            if marker == 0xDA:
                break
            pos += 2 + length
        raise DecodeError("JPEG stream without a frame header (SOF)")
    raise DecodeError(f"unknown codestream (starts with {data[:8].hex(' ')})")


J2K_SYNTAXES = uids.J2K


def check_codestream(path: str, rows: int, columns: int, ds=None,
                     transfer_syntax: str | None = None) -> Codestream:
    """Parse the first frame's header and check it agrees with Rows and Columns (and with the
    transfer syntax: a JPEG stream labelled JPEG 2000 is refused, and the reverse)."""
    try:
        cs = parse_codestream(first_frame(path, ds))
    except DecodeError as e:
        msg = str(e)
        raise DecodeError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if transfer_syntax is not None:
        expect = "JPEG 2000" if transfer_syntax in J2K_SYNTAXES else "JPEG"
        got = "JPEG" if cs.kind == "jpeg" else "JPEG 2000"
        if expect != got:
            raise DecodeError(f"{path}: the transfer syntax {transfer_syntax} says {expect} but "
                              f"the frame is a {got} stream; fix the file's TransferSyntaxUID")
    if (cs.rows, cs.columns) != (rows, columns):
        raise DecodeError(f"{path}: the codestream is {cs.rows} x {cs.columns} but Rows x "
                          f"Columns say {rows} x {columns}; the header is wrong")
    return cs


RLE_LOSSLESS = uids.RLE_LOSSLESS


def check_rle_header(path: str, bits_allocated: int, samples: int = 1, ds=None) -> None:
    """PS3.5 G.5: an RLE frame starts with a 64-byte header: the number of segments (one per
    byte of each sample, so 2 for 16-bit grayscale) and their offsets, increasing and inside the
    frame. dicomsdl 0.109 segfaults on a header that claims 2013 segments (found by the fuzz
    test), so the header is checked before any decoder sees it."""
    frame = first_frame(path, ds)
    if len(frame) < 64:
        raise DecodeError(f"{path}: RLE frame of {len(frame)} bytes is shorter than its 64-byte header")
    n = int.from_bytes(frame[:4], "little")
    expect = samples * max(1, bits_allocated // 8)
    if n != expect:
        raise DecodeError(f"{path}: the RLE header declares {n} segments; {bits_allocated}-bit "
                          f"data with {samples} sample(s) needs {expect}; the pixel data is corrupt")
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(n)]
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= len(frame):
        raise DecodeError(f"{path}: the RLE segment offsets {offsets} do not fit a frame of "
                          f"{len(frame)} bytes; the pixel data is corrupt")
