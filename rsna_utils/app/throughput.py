"""The measured numbers a plan's estimate rests on (`app.estimate`'s docstring says where each
comes from): the GPUs' training and inference rates from the H200 anchors (`throughput`), what
the DataLoader workers deliver (`worker_img_s`), DICOM preprocessing (`preprocess_img_s`), and
the memory of a training batch (`training_memory_gib`, from `activation_bytes` measured on the
CPU). Moved out of `app.estimate`, which re-exports them."""
from __future__ import annotations

import math
from functools import lru_cache

from rsna_utils.core.errors import RsnaError

# timm, random input, bf16, channels_last, AdamW, one H200 (ANCHORS.md): model -> [((h, w),
# batch, train img/s, inference img/s)]
H200_ANCHORS = {
    "resnet18": [((256, 256), 64, 5323, 25002), ((512, 512), 64, 2584, 7830)],
    "resnext50_32x4d": [((512, 512), 32, 675, 2484)],
    "efficientnet_b0": [((512, 512), 32, 841, 4274)],
    "efficientnet_b2": [((768, 768), 16, 224, 1360)],
    "convnext_small": [((2048, 1024), 8, 47, 140)],
}
# models never measured, timed as the measured one of the same shape, and said so: the
# EfficientNet-Lites are the EfficientNets without squeeze-excitation and with ReLU6 (Lite0:
# B0's blocks, 4.7M parameters against 5.3M; Lite2: B2's, 6.1M against 9.1M), so no slower on a
# GPU; timed as those, the estimate errs on the long side
PROXIES = {"tf_efficientnet_lite0": "efficientnet_b0", "tf_efficientnet_lite2": "efficientnet_b2"}
PREPROCESS_IMG_S = 42.5    # DICOM -> PNG end to end on the H200, nvImageCodec (BENCHMARKS.md)
# A DataLoader worker's CPU time per image, ms per megapixel, measured on the 2-core CPU:
# reading an 8-bit PNG, resizing and the light augmentation, handing over uint8 (issue 32:
# 11.0 ms an image at 1536x768, benchmarks/input_bench.py), and what the heavy level adds
# (5.8 ms an image at 1024x512: 7.3 against 1.5, tests/learn/test_recipe.py's transforms)
WORKER_MS_PER_MPIX = 11.0 / (1536 * 768 / 1e6)
HEAVY_MS_PER_MPIX = 5.8 / (1024 * 512 / 1e6)
# the breast box's aspect kept, padded: the PNGs of the kaggle plan are 2048x1024
PNG_SIZE = (2048, 1024)
# speed relative to an H200, memory GiB, CPU cores beside it. The T4 (Kaggle's submission GPU)
# is an assumption from its specifications: 65 fp16 TFLOPS and 320 GB/s against about 990 and
# 4,800: 1/15 of an H200, the factor BENCHMARKS.md's first estimate used; its 4 CPU cores read
# the DICOMs, which on the H200 machine took 14 threads.
GPUS = {"h200": (1.0, 141, 16), "h100": (0.85, 80, 16), "t4": (1 / 15, 16, 4),
        "t4x2": (1 / 15, 16, 4)}
# GPUs of a kind (speed and memory above are each one's): Kaggle's "GPU T4 x2" accelerator, two
# T4s beside the same 4 CPU cores. Inference with `shards: auto` (issue 41) runs a process per
# GPU on half the patients each: the models' time halves, the DICOM reading does not (the 4
# cores read for both; one T4's nvImageCodec already reads faster than they hand it frames).
# Training runs on one of them.
GPU_COUNT = {"t4x2": 2}


def gpu_name(gpu: str) -> str:
    """"one T4", "a T4 x2 (two T4s)": what the estimate is for, in words."""
    n = GPU_COUNT.get(gpu, 1)
    return f"one {gpu.upper()}" if n == 1 else f"a {gpu[:-2].upper()} x{n} ({n} {gpu[:-2].upper()}s)"


DECODE_CEILING_IMG_S = 193.2   # nvImageCodec decode only, batch 64, the H200 run's mixed set


def preprocess_img_s(gpu: str) -> float:
    """DICOM -> model input end to end: 42.5 img/s on the H200 machine, where reading headers
    and frames on its 16 cores was the limit (BENCHMARKS.md); scaled by the cores, and never
    above the GPU's decode ceiling (193 img/s on the H200, scaled by the GPU's speed)."""
    speed, _, cores = GPUS[gpu]
    return min(PREPROCESS_IMG_S * min(1.0, cores / 16),
               DECODE_CEILING_IMG_S * speed * GPU_COUNT.get(gpu, 1))


def worker_img_s(workers: int, size, gpu: str = "h100", aug_level: str | None = None,
                 png_size=PNG_SIZE) -> float:
    """Images a second the DataLoader workers deliver: each reads a PNG of `png_size`, resizes
    it to `size` and augments it (None: no augmentation, validation), one core a worker, the
    GPU box's cores less one for the training process."""
    cores = GPUS[gpu][2]
    n = max(1, min(int(workers or 1), cores - 1))
    ms = WORKER_MS_PER_MPIX * png_size[0] * png_size[1] / 1e6
    if aug_level == "heavy":
        ms += HEAVY_MS_PER_MPIX * size[0] * size[1] / 1e6
    return n * 1000.0 / ms


def throughput(model: str, size: tuple[int, int], gpu: str = "h100") -> tuple[float, float, str]:
    """(train img/s, inference img/s, source) on one `gpu` from the H200 anchors, scaled by the
    pixel count from the nearest measured size of the same model (or of its `PROXIES` stand-in,
    named in the source). A model never measured is an error naming those that were."""
    measured = model if model in H200_ANCHORS else PROXIES.get(model)
    if measured is None:
        raise RsnaError(f"model {model!r}: no measured throughput to estimate from; measured: "
                        f"{sorted(H200_ANCHORS)}. Measure it on the GPU at hand with --calibrate "
                        "(it times the plan's image-level steps; a breast-level step takes the "
                        "rate of an image-level step of the same model and size), or add its "
                        "ANCHORS.md figures to H200_ANCHORS")
    pixels = size[0] * size[1]
    (h, w), _, tr, inf = min(H200_ANCHORS[measured],
                             key=lambda a: abs(math.log(a[0][0] * a[0][1] / pixels)))
    scale = h * w / pixels * GPUS[gpu][0]
    src = (f"{measured} @{h}x{w} on an H200" + ("" if (h, w) == tuple(size) else
                                                  f", scaled to {size[0]}x{size[1]}")
           + ("" if measured == model else f" (standing in for {model}, not measured itself)"))
    return tr * scale, inf * scale, src


@lru_cache(maxsize=None)
def activation_bytes(model: str, size: tuple[int, int], probe: tuple[int, int] = (256, 128),
                     global_pool: str = "gem", drop_path: float = 0.0) -> float:
    """Bytes autograd keeps for the backward pass of one image at `size`, measured at `probe`
    under bf16 autocast on the CPU (every saved tensor counted once) and scaled by the pixels."""
    import torch

    from rsna_utils.learn.models import create_model
    net = create_model(model, 3, None, global_pool=global_pool, drop_path=drop_path).train()
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(id(t.untyped_storage()) if t.layout == torch.strided else id(t),
                        t.untyped_storage().nbytes() if t.layout == torch.strided else 0)
        return t

    x = torch.zeros(1, 3, *probe)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum()
    return sum(seen.values()) * (size[0] * size[1]) / (probe[0] * probe[1])


@lru_cache(maxsize=None)
def parameter_count(model: str) -> int:
    from rsna_utils.learn.models import create_model
    return sum(p.numel() for p in create_model(model, 3, None).parameters())


def training_memory_gib(model: str, size, batch: int, ema: bool, global_pool: str = "gem",
                        drop_path: float = 0.0) -> float:
    """Activations of one batch plus fp32 weights, gradients, AdamW's two moments (and the EMA
    copy): 16 (20) bytes a parameter. A floor: cuDNN's workspace and the allocator's slack come
    on top (leave about 10%)."""
    per_param = 16 + (4 if ema else 0)
    return (activation_bytes(model, tuple(size), global_pool=global_pool, drop_path=drop_path) * batch
            + parameter_count(model) * per_param) / 2**30
