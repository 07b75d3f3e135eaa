"""NVIDIA DALI: JPEG 2000 and lossless JPEG frames decoded on the GPU ("mixed") in batches.
A plug-in of `rsna_utils.dicom.decoders`: the single-file `decode` goes through the batch path."""
from __future__ import annotations

import numpy as np

from rsna_utils.dicom import uids
from rsna_utils.dicom.decoders.gpu_shared import decode_one, import_error

NAME = "dali"
SYNTAXES = uids.FRAME_DECODABLE
PACKAGES = "nvidia-dali-cuda130 (pip install -r requirements-gpu.txt)"
DEVICE = "gpu"
ORDER = 20


def why_unavailable() -> str | None:
    return import_error("nvidia.dali")


def is_available() -> bool:
    return why_unavailable() is None


def decode(path: str, h) -> np.ndarray:
    return decode_one(NAME, h, BatchDecoder)


class DaliDecoder:
    """Batched decode with DALI `fn.decoders.image(dtype=UINT16)` fed by an external source;
    device "cuda" uses the mixed (GPU) decoder, "cpu" the CPU one. Outputs go to torch through
    DLPack as uint16 tensors (never through int16, which would wrap values above 32767)."""

    def __init__(self, device: str = "cuda", batch_size: int = 32, device_id: int = 0,
                 num_threads: int = 4):
        self.device, self.batch_size = device, batch_size
        self.device_id, self.num_threads = device_id, num_threads
        self.rebuilds = 0          # pipelines rebuilt after a failed batch
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        dec_device = "mixed" if self.device == "cuda" else "cpu"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id if self.device == "cuda" else None,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            data = fn.external_source(name="frames", dtype=types.UINT8, no_copy=False)
            return fn.decoders.image(data, device=dec_device, output_type=types.ANY_DATA,
                                     dtype=types.UINT16)
        built = pipe()
        built.build()
        return built

    def _rebuild(self) -> None:
        """A fresh pipeline: after an operator error DALI does not promise the old one still
        runs (some versions and executors leave it failed), so a retry never relies on it."""
        self.pipe = self._build()
        self.rebuilds += 1

    def decode(self, frames: list[bytes]) -> list:
        out = []
        for i in range(0, len(frames), self.batch_size):
            chunk = [np.frombuffer(f, np.uint8) for f in frames[i:i + self.batch_size]]
            try:
                out += self._run(chunk)
            except RuntimeError:
                self._rebuild()
                for one in chunk:    # a bad frame fails the whole batch: retry one by one
                    try:
                        out += self._run([one])
                    except RuntimeError:
                        self._rebuild()
                        out.append(None)
        return out

    def _run(self, chunk: list[np.ndarray]) -> list:
        self.pipe.feed_input("frames", chunk)
        (res,) = self.pipe.run()
        res = res.as_cpu() if self.device == "cpu" else res
        outs = []
        for k in range(len(chunk)):
            t = res[k]
            if self.device == "cpu":
                outs.append(np.array(t)[..., 0])
            else:
                import torch
                outs.append(torch.from_dlpack(t)[..., 0])
        return outs


BatchDecoder = DaliDecoder
