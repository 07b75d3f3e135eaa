"""Where a model runs: the device asked for, and the half precision it computes natively."""
from __future__ import annotations

from rsna_utils.core.errors import RsnaError, say_once


def resolve_device(name: str, local_rank: int = 0):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RsnaError("device 'cuda' asked for but no CUDA GPU is available; use device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def half_dtype(device):
    """bf16 on a GPU that computes it natively (compute capability 8+: A100, H100, L4, ...),
    fp16 on older ones (Kaggle's T4 and P100). Not `torch.cuda.is_bf16_supported()`: it says
    yes on a T4 too (bf16 emulated, slow); None off the GPU."""
    import torch
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16
    say_once(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no "
             "native bf16: mixed precision runs in fp16 (with a gradient scaler in training)")
    return torch.float16

