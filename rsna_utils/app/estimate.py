"""A plan's dry run: each step's images, batches, expected time on one GPU and memory per
batch, before anything runs (`rsna notebooks --plan kaggle --estimate`).

Times come from measured throughputs, not from a model of the hardware:
- training and inference ceilings: timm on random input, bf16, channels_last, one H200
  (`../shared/docs/ANCHORS.md`), scaled by pixel count to the step's input where the size was
  not measured;
- the share of that ceiling a run from PNGs reaches: 0.37 (`BENCHMARKS.md`, GPU section:
  resnext50_32x4d @512 from PNGs 250 img/s against 671 on random input; 0.29-0.41 across the
  three models measured), the data pipeline being the limit until issue 32 feeds the GPU;
- DICOM -> PNG preprocessing end to end, nvImageCodec: 42.5 img/s (same section);
- an H100 at 0.85 of an H200: the same GH100 compute, 0.70 of the memory bandwidth (3.35 against
  4.8 TB/s), which the depthwise convolutions and normalisations of EfficientNet and ConvNeXt
  feel. Not measured: an assumption, stated in the output.

Memory per batch is measured, not looked up: the tensors autograd keeps for the backward pass
of one image at a small input under bf16 autocast on the CPU, scaled by the pixel ratio and the
batch (activations grow with the pixels for these convolutional networks), plus the fp32
weights, gradients, AdamW's two moments and the EMA copy."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

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
FROM_PNG = 0.37            # share of the random-input ceiling reached from PNGs (BENCHMARKS.md)
PREPROCESS_IMG_S = 42.5    # DICOM -> PNG end to end on the H200, nvImageCodec (BENCHMARKS.md)
# speed relative to an H200, memory GiB, CPU cores beside it. The T4 (Kaggle's submission GPU)
# is an assumption from its specifications: 65 fp16 TFLOPS and 320 GB/s against about 990 and
# 4,800: 1/15 of an H200, the factor BENCHMARKS.md's first estimate used; its 4 CPU cores read
# the DICOMs, which on the H200 machine took 14 threads.
GPUS = {"h200": (1.0, 141, 16), "h100": (0.85, 80, 16), "t4": (1 / 15, 16, 4)}
# the competition's train.csv when the plan's data is not at hand (RSNA_DATA.md)
COMPETITION = dict(images=54_706, positives=1_158)
HIDDEN_TEST_IMAGES = 32_000    # about 8,000 patients x 4 views (the hidden test set)


@dataclass
class StepEstimate:
    step: str
    what: str
    images: int            # images passed per epoch (training), or processed (other steps)
    batches: int
    epochs: int
    hours: float
    memory_gib: float | None = None
    note: str = ""


DECODE_CEILING_IMG_S = 193.2   # nvImageCodec decode only, batch 64, the H200 run's mixed set


def preprocess_img_s(gpu: str) -> float:
    """DICOM -> model input end to end: 42.5 img/s on the H200 machine, where reading headers
    and frames on its 16 cores was the limit (BENCHMARKS.md); scaled by the cores, and never
    above the GPU's decode ceiling (193 img/s on the H200, scaled by the GPU's speed)."""
    speed, _, cores = GPUS[gpu]
    return min(PREPROCESS_IMG_S * min(1.0, cores / 16), DECODE_CEILING_IMG_S * speed)


def throughput(model: str, size: tuple[int, int], gpu: str = "h100") -> tuple[float, float, str]:
    """(train img/s, inference img/s, source) on one `gpu` from the H200 anchors, scaled by the
    pixel count from the nearest measured size of the same model. A model never measured is an
    error naming those that were."""
    if model not in H200_ANCHORS:
        raise RsnaError(f"model {model!r}: no measured throughput to estimate from; measured: "
                        f"{sorted(H200_ANCHORS)} (add its ANCHORS.md figures to H200_ANCHORS)")
    pixels = size[0] * size[1]
    (h, w), _, tr, inf = min(H200_ANCHORS[model], key=lambda a: abs(math.log(a[0][0] * a[0][1] / pixels)))
    scale = h * w / pixels * GPUS[gpu][0]
    src = f"{model} @{h}x{w} on an H200" + ("" if (h, w) == tuple(size) else f", scaled to {size[0]}x{size[1]}")
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


def _labels(csv: str | Path | None) -> tuple[np.ndarray, pd.DataFrame | None, str]:
    if csv and Path(csv).is_file():
        df = pd.read_csv(csv)
        if "cancer" in df:
            return df.cancer.to_numpy(), df, str(csv)
    n, pos = COMPETITION["images"], COMPETITION["positives"]
    return np.r_[np.ones(pos), np.zeros(n - pos)], None, (
        f"the competition's train.csv ({n:,} images, {pos:,} positive; {csv} not found)")


def estimate_training(params: dict, gpu: str = "h100", memory: bool = True) -> StepEstimate:
    """One `03_train` step: the sampler's epoch length on its training part (`learn.data.balance`),
    batches, time for its epochs (training plus the validation pass, twice with tta), memory."""
    from rsna_utils.learn.data import balance, check_ratio
    from rsna_utils.learn.train_config import TrainConfig
    cfg = TrainConfig.from_dict(params)
    labels, df, source = _labels(cfg.csv)
    views = 2 if cfg.level == "breast" else 1      # a breast-level item: a CC and an MLO
    if views == 2:
        labels = (df.groupby(["patient_id", "laterality"]).cancer.max().to_numpy() if df is not None
                  else labels[::2])          # the competition's: about two views per breast
        source += "; per breast"
    check_ratio(labels, cfg.target_ratio, cfg.min_positives, cfg.batch_size, cfg.upsample)
    n = len(labels)
    val_share = (1 / cfg.folds) if cfg.split == "kfold" else cfg.val_frac
    rng = np.random.default_rng(0)
    train_labels = labels[rng.random(n) >= val_share]       # the patient split, in expectation
    b = balance(train_labels, cfg.upsample, cfg.target_ratio, cfg.batch_size, cfg.min_positives,
                cfg.pos_weight, cfg.neg_weight, cfg.seed)
    size = cfg.size if isinstance(cfg.size, (list, tuple)) else (cfg.size, cfg.size)
    size = tuple(int(v) for v in (size if len(size) == 2 else (size[0], size[0])))
    tr, inf, src = throughput(cfg.model, size, gpu)
    val_images = int(round(n * val_share)) * views
    seconds = cfg.epochs * (b.epoch_images * views / (tr * FROM_PNG)
                            + val_images * (2 if cfg.tta else 1) / (inf * FROM_PNG))
    mem = (training_memory_gib(cfg.model, size, cfg.batch_size * views,
                               bool(cfg.ema or cfg.ema_epochs), cfg.global_pool, cfg.drop_path)
           if memory else None)
    unit = " breasts" if views == 2 else ""
    return StepEstimate("", f"train {cfg.model} {size[0]}x{size[1]} batch {cfg.batch_size}{unit}",
                        b.epoch_images * views, math.ceil(b.epoch_images / cfg.batch_size),
                        cfg.epochs, seconds / 3600, mem, f"{src}; labels: {source}")


def estimate_plan(plan: str | Path, data: str | Path = "data/synthetic", gpu: str = "h100",
                  memory: bool = True, **kw) -> list[StepEstimate]:
    """Every step of the plan, resolved as `run_plan` resolves it, estimated on one `gpu`."""
    from rsna_utils.app.notebooks import plan_steps
    if gpu not in GPUS:
        raise RsnaError(f"gpu {gpu!r}: choose {' or '.join(sorted(GPUS))}")
    _, _, todo, _ = plan_steps(plan, data, **kw)
    out = []
    train_steps = [p for _, _, nb, p in todo if nb.name.startswith("03_")]
    if not train_steps:      # the submit plan: the models of the kaggle plan's export
        from rsna_utils.app.notebooks import plan_steps
        train_steps = [p for _, _, nb, p in plan_steps("kaggle", data, **kw)[2]
                       if nb.name.startswith("03_") and not str(p.get("out", "")).endswith("resnet18_512x256")]
    for _, name, nb, params in todo:
        if nb.name.startswith("03_"):
            try:
                e = estimate_training(params, gpu, memory)
            except RsnaError as err:
                raise RsnaError(f"plan step {name}: {err}") from None
        elif nb.name.startswith("02_"):
            labels, _, _ = _labels(params.get("csv_path"))
            n = len(labels)
            e = StepEstimate("", "DICOM -> PNG, nvImageCodec", n, 0, 1,
                             n / preprocess_img_s(gpu) / 3600,
                             note=f"{PREPROCESS_IMG_S} img/s end to end on an H200 (BENCHMARKS.md)")
        elif nb.name.startswith("04_"):
            e = _estimate_inference(params, train_steps, gpu)
        else:
            e = StepEstimate("", "EDA / report", 0, 0, 1, 0.05, note="minutes; not timed")
        e.step = name
        out.append(e)
    return out


def _estimate_inference(params: dict, train_steps: list[dict], gpu: str) -> StepEstimate:
    """04: the test images decoded once per checkpoint's input size, every checkpoint (with the
    flip) run on them; the hidden test set's size when the plan's test.csv is not at hand."""
    csv = params.get("csv")
    n = len(pd.read_csv(csv)) if csv and Path(csv).is_file() else HIDDEN_TEST_IMAGES
    ckpts = {str(c) for c in params.get("checkpoints") or []} if not params.get("ensemble") else set()
    seconds = n / preprocess_img_s(gpu)
    used, flip = 0, params.get("tta", True) is not False
    for p in train_steps:
        if ckpts and f"{p['out']}/best.pt" not in ckpts:
            continue
        used += 1
        size = p["size"] if isinstance(p["size"], (list, tuple)) else (p["size"], p["size"])
        _, inf, _ = throughput(p["model"], tuple(size), gpu)
        # the input is decoded once and already on the device: the model's own ceiling
        seconds += n * (2 if flip else 1) / inf
    return StepEstimate("", f"inference, {used} checkpoints" + (" with the flip" if flip else ""),
                        n, 0, 1,
                        seconds / 3600, note=f"{n:,} test images, decoded once")


def table(rows: list[StepEstimate], gpu: str = "h100") -> str:
    speed, gib, _ = GPUS[gpu]
    lines = [f"| step | what | images an epoch | batches an epoch | epochs | hours on one {gpu.upper()} "
             f"| memory (GiB, of {gib}) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "" if r.memory_gib is None else (f"{r.memory_gib:.1f}" + (" (over!)" if r.memory_gib > gib * 0.9 else ""))
        lines.append(f"| {r.step} | {r.what} | {r.images:,} | {r.batches:,} | {r.epochs} | "
                     f"{r.hours:.2f} | {mem} |")
    total = sum(r.hours for r in rows)
    lines.append(f"| **all** | | | | | **{total:.1f}** | |")
    lines.append(f"\nAssumed: training and inference from PNGs / decoded images at {FROM_PNG} of "
                 f"the random-input ceiling (the H200 run, BENCHMARKS.md); one {gpu.upper()} at "
                 f"{speed:.2g} of an H200 (an assumption from its specifications), DICOM reading at "
                 f"{preprocess_img_s(gpu):.1f} img/s; memory is a floor (activations measured at "
                 "256x128 under bf16 autocast and scaled, plus weights, gradients, AdamW and the EMA).")
    return "\n".join(lines)
