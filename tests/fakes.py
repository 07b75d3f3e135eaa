"""Test doubles shared by several test folders (import them `from fakes import ...`: this folder
is on sys.path, as for conftest): a GPU decoder that misbehaves on demand, and a DICOM whose
pixels are the negative of what its PhotometricInterpretation says."""
from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from rsna_utils.dicom.decoders import gpu_batch
from rsna_utils.dicom.frames import parse_codestream


class FakeGpuDecoder:
    """Decodes with imagecodecs, then behaves as a GPU decoder might: "exact", "scaled" (DALI's
    16-bit scaling of P < 16-bit codestreams), "wrong" (one pixel off) or "none" (rejects),
    for the codestream kinds in `kinds` (the others decode exactly)."""

    def __init__(self, how: str, kinds=("jp2", "j2k", "jpeg")):
        self.how, self.kinds, self.device, self.calls = how, kinds, "cpu", 0

    def decode(self, frames):
        import torch
        out = []
        for f in frames:
            self.calls += 1
            cs = parse_codestream(f)
            try:
                x = gpu_batch.cpu_decode_frame(f, cs.kind).astype(np.int64)
            except Exception:
                out.append(None)
                continue
            how = self.how if cs.kind in self.kinds else "exact"
            if how == "none":
                out.append(None)
                continue
            if how == "scaled" and cs.precision < 16:
                x = np.rint(x * 65535 / (2 ** cs.precision - 1))
            elif how == "wrong":
                x[x.shape[0] // 2, x.shape[1] // 2] += 1
            out.append(torch.from_numpy(x.astype(np.int32)))
        return out


def negative_dicom(src, dst, photometric, j2k=False):
    """The image's stored values mirrored (background now at the top of the range), written
    uncompressed (or JPEG 2000 lossless, which the GPU path decodes), labelled `photometric`,
    without its window (min-max fallback)."""
    ds = pydicom.dcmread(src)
    a = ds.pixel_array.astype(np.uint16)
    top = 2 ** int(ds.BitsStored) - 1
    neg = (top - a).astype(np.uint16)
    if j2k:
        import imagecodecs
        from pydicom.encaps import encapsulate
        frame = imagecodecs.jpeg2k_encode(neg, level=0, reversible=True, codecformat="j2k",
                                          bitspersample=int(ds.BitsStored), numthreads=1)
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    else:
        ds.PixelData = neg.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = photometric
    for tag in ("WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction",
                "PixelPaddingValue"):
        if tag in ds:
            delattr(ds, tag)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
