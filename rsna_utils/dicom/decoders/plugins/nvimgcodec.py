"""nvImageCodec (NVIDIA): JPEG 2000 and lossless JPEG frames decoded on the GPU in batches.
A plug-in of `rsna_utils.dicom.decoders`: the single-file `decode` goes through the batch path."""
from __future__ import annotations

import numpy as np

from rsna_utils.dicom import uids
from rsna_utils.dicom.decoders.gpu_shared import decode_one, import_error

NAME = "nvimgcodec"
SYNTAXES = uids.FRAME_DECODABLE
PACKAGES = "nvidia-nvimgcodec-cu13 (pip install -r requirements-gpu.txt)"
DEVICE = "gpu"
ORDER = 10


def why_unavailable() -> str | None:
    return import_error("nvidia.nvimgcodec")


def is_available() -> bool:
    return why_unavailable() is None


def decode(path: str, h) -> np.ndarray:
    return decode_one(NAME, h, BatchDecoder)


class NvImageCodecDecoder:
    """Batched decode with nvImageCodec: device "cuda" (GPU, torch tensors) or "cpu"
    (its CPU-only backend: JPEG 2000 only; numpy arrays). Returns None where it failed."""

    def __init__(self, device: str = "cuda", batch_size: int = 32, device_id: int = 0):
        from nvidia import nvimgcodec as nv
        self.nv, self.device, self.batch_size = nv, device, batch_size
        if device == "cpu":
            self.decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                      backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        else:
            self.decoder = nv.Decoder(device_id=device_id)
        # allow_any_depth keeps 12/16-bit values as uint16 instead of scaling to uint8
        self.params = nv.DecodeParams(allow_any_depth=True, color_spec=nv.ColorSpec.UNCHANGED,
                                      sample_format=nv.SampleFormat.I_UNCHANGED)

    def decode(self, frames: list[bytes]) -> list:
        if len(frames) > self.batch_size:
            return [x for i in range(0, len(frames), self.batch_size)
                    for x in self.decode(frames[i:i + self.batch_size])]
        try:
            images = self.decoder.decode([self.nv.CodeStream(f) for f in frames], params=self.params)
        except Exception:
            if len(frames) == 1:
                return [None]
            return [x for f in frames for x in self.decode([f])]   # isolate the bad frame
        out = []
        for img in images:
            if img is None:
                out.append(None)
            elif self.device == "cpu":
                out.append(np.asarray(img.cpu())[..., 0])
            else:
                import torch
                out.append(torch.as_tensor(img, device="cuda")[..., 0])
        return out


BatchDecoder = NvImageCodecDecoder
