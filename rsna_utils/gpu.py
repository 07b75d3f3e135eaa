"""GPU decoding backends (nvImageCodec, DALI). Filled in by the GPU issue; importing this module
never imports CUDA packages."""
from __future__ import annotations

GPU_BACKENDS: dict = {}
