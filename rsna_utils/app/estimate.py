"""A plan's dry run: each step's images, batches, expected time on one GPU and memory per
batch, before anything runs (`rsna notebooks --plan kaggle --estimate`), or from rates measured
on the machine at hand (`--calibrate`).

Times come from measured throughputs, not from a model of the hardware:
- training and inference ceilings: timm on random input, bf16, channels_last, one H200
  (`../shared/docs/ANCHORS.md`), scaled by pixel count to the step's input where the size was
  not measured (or the rates `--calibrate` measured here);
- the data pipeline: the DataLoader workers' CPU time per image (read the PNG, resize, augment;
  the uint8 input of issue 32), measured on this project's 2-core CPU by
  `benchmarks/input_bench.py` and per augmentation level, scaled by the pixels; a step runs at
  the lower of the GPU's ceiling and what its workers deliver. A GPU-bound model (ConvNeXt at
  2048x1024) is not slowed by the PNGs; a small fast one (ResNet18 at 512x256) waits for them.
  (Before issue 32 the pipeline gave 0.29-0.41 of the ceiling on the H200: float32 batches of
  3 channels, about 0.7 GB/s, were the limit; the uint8 input moves a twelfth of the bytes.)
- DICOM -> PNG preprocessing end to end, nvImageCodec: 42.5 img/s (BENCHMARKS.md, H200);
- an H100 at 0.85 of an H200: the same GH100 compute, 0.70 of the memory bandwidth (3.35 against
  4.8 TB/s), which the depthwise convolutions and normalisations of EfficientNet and ConvNeXt
  feel. Not measured: an assumption, stated in the output.

Memory per batch is measured, not looked up: the tensors autograd keeps for the backward pass
of one image at a small input under bf16 autocast on the CPU, scaled by the pixel ratio and the
batch (activations grow with the pixels for these convolutional networks), plus the fp32
weights, gradients, AdamW's two moments and the EMA copy. Held against the 1st place, who
trained ConvNeXt-small at 2048x1024 at batch 8 under AMP on a 40 GB A100, this floor is about
twice too high for ConvNeXt (76 GiB at batch 8): CPU autocast keeps float32 copies that CUDA's
fused kernels do not. `--calibrate` on a GPU measures the real peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size

# timm, random input, bf16, channels_last, AdamW, one H200 (ANCHORS.md): model -> [((h, w),
# batch, train img/s, inference img/s)]
H200_ANCHORS = {
    "resnet18": [((256, 256), 64, 5323, 25002), ((512, 512), 64, 2584, 7830)],
    "resnext50_32x4d": [((512, 512), 32, 675, 2484)],
    "efficientnet_b0": [((512, 512), 32, 841, 4274)],
    "efficientnet_b2": [((768, 768), 16, 224, 1360)],
    "convnext_small": [((2048, 1024), 8, 47, 140)],
}
PREPROCESS_IMG_S = 42.5    # DICOM -> PNG end to end on the H200, nvImageCodec (BENCHMARKS.md)
# A DataLoader worker's CPU time per image, ms per megapixel, measured on the 2-core CPU:
# reading an 8-bit PNG, resizing and the light augmentation, handing over uint8 (issue 32:
# 11.0 ms an image at 1536x768, benchmarks/input_bench.py), and what the heavy level adds
# (5.8 ms an image at 1024x512: 7.3 against 1.5, tests/test_recipe.py's transforms)
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
# the competition's train.csv when the plan's data is not at hand (RSNA_DATA.md)
COMPETITION = dict(images=54_706, positives=1_158)
# the hidden test set: about 8,000 patients x 4.59 images each (train.csv's images per patient)
HIDDEN_TEST_IMAGES = 36_700
# images of the public sources, for a plan whose source folders are not at hand: VinDr-Mammo
# 20,000 (5,000 exams x 4), CBIS-DDSM 2,620 full-field scans, CMMD 5,202 (their own papers)
SOURCE_IMAGES = {"vindr": 20_000, "cbis-ddsm": 2_620, "cmmd": 5_202}


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


def estimate_training(params: dict, gpu: str = "h100", memory: bool = True,
                      extra_images: float = 0.0, png_size=PNG_SIZE,
                      rates: dict | None = None) -> StepEstimate:
    """One `03_train` step: the sampler's epoch length on its training part (`learn.data.balance`)
    plus `extra_images` drawn from other sources an epoch (their weights x images), batches,
    time for its epochs (training plus the validation pass, twice with tta) at the lower of the
    GPU's ceiling and its workers' rate, memory. `rates`: {(model, size): (train, inference)}
    img/s measured by `calibrate`, in place of the anchors."""
    from rsna_utils.learn.samplers import balance, check_ratio
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
    size = tuple(parse_size(cfg.size, MIN_MODEL_SIDE))
    epoch_items = b.epoch_images + int(round(extra_images / views))
    if rates and (cfg.model, size) in rates:
        tr, inf = rates[(cfg.model, size)]
        src = f"{cfg.model} @{size[0]}x{size[1]} measured here (--calibrate)"
    else:
        tr, inf, src = throughput(cfg.model, size, gpu)
    feed = worker_img_s(cfg.workers, size, gpu, cfg.aug_level if cfg.augment else None, png_size)
    feed_val = worker_img_s(cfg.workers, size, gpu, None, png_size)
    train_rate, val_rate = min(tr, feed), min(inf, feed_val)
    bound = "GPU-bound" if tr <= feed else f"input-bound ({cfg.workers} workers)"
    val_images = int(round(n * val_share)) * views
    seconds = cfg.epochs * (epoch_items * views / train_rate
                            + val_images * (2 if cfg.tta else 1) / val_rate)
    mem = (training_memory_gib(cfg.model, size, cfg.batch_size * views,
                               bool(cfg.ema or cfg.ema_epochs), cfg.global_pool, cfg.drop_path)
           if memory else None)
    unit = " breasts" if views == 2 else ""
    more = f"; {extra_images:,.0f} source images an epoch" if extra_images else ""
    return StepEstimate("", f"train {cfg.model} {size[0]}x{size[1]} batch {cfg.batch_size}{unit}",
                        epoch_items * views, math.ceil(epoch_items / cfg.batch_size),
                        cfg.epochs, seconds / 3600, mem,
                        f"{src}; {train_rate:.0f} img/s, {bound}; labels: {source}{more}")


def source_images(sources: list[dict] | None) -> tuple[float, int, list[str]]:
    """Images a training epoch draws from the plan's sources other than RSNA (weight x images:
    their train.csv when at hand, else SOURCE_IMAGES), the images they hold (preprocessed
    once), and a line per source saying which."""
    total, held, lines = 0.0, 0, []
    for s in sources or []:
        if s["name"] == "rsna":
            continue
        csv = Path(s["dir"]) / "train.csv" if "dir" in s else Path(s.get("csv", ""))
        if csv.is_file():
            n, how = len(pd.read_csv(csv, usecols=[0])), str(csv)
        else:
            n, how = SOURCE_IMAGES.get(s["name"], 0), (
                "its published size; the folder is not at hand" +
                (", so a run now would skip it" if s.get("optional") else ""))
        total += float(s["weight"]) * n
        held += n
        lines.append(f"{s['name']}: {n:,} images x weight {float(s['weight']):g} ({how})")
    return total, held, lines


def estimate_plan(plan: str | Path, data: str | Path = "data/synthetic", gpu: str = "h100",
                  memory: bool = True, rates: dict | None = None, notes: list | None = None,
                  **kw) -> list[StepEstimate]:
    """Every step of the plan, resolved as `run_plan` resolves it (its sources, variant and
    overrides), estimated on one `gpu` (`rates`: measured by `calibrate`). `notes` gets a line
    per source and per skipped source."""
    from rsna_utils.app.notebooks import plan_steps
    if gpu not in GPUS:
        raise RsnaError(f"gpu {gpu!r}: choose {' or '.join(sorted(GPUS))}")
    said: list = [] if notes is None else notes
    # a source not at hand is counted at its published size: the estimate comes before the data
    d, _, todo, _ = plan_steps(plan, data, say=said.append, skip_missing=False, **kw)
    extra, held, lines = source_images(d.get("sources"))
    said += [f"source {x}" for x in lines]
    png = next((tuple(parse_size(p["size"], MIN_MODEL_SIDE)) for _, _, nb, p in todo
                if nb.name.startswith("02_") and p.get("size")), PNG_SIZE)
    out = []
    train_steps = [p for _, _, nb, p in todo if nb.name.startswith("03_")]
    if not train_steps:      # the submit plan: the models the kaggle plan exports
        kaggle = plan_steps("kaggle", data, say=lambda m: None,
                            **{k: v for k, v in kw.items() if k not in ("variant", "overrides")})[2]
        train_steps = exported_steps(kaggle)
    for _, name, nb, params in todo:
        if nb.name.startswith("03_"):
            try:
                e = estimate_training(params, gpu, memory, extra, png, rates)
            except RsnaError as err:
                raise RsnaError(f"plan step {name}: {err}") from None
        elif nb.name.startswith("02_"):
            labels, _, _ = _labels(params.get("csv_path"))
            n = len(labels) + held
            e = StepEstimate("", "DICOM -> PNG, nvImageCodec", n, 0, 1,
                             n / preprocess_img_s(gpu) / 3600,
                             note=f"{PREPROCESS_IMG_S} img/s end to end on an H200 (BENCHMARKS.md)")
        elif nb.name.startswith("04_"):
            e = _estimate_inference(params, train_steps, gpu, rates)
        else:
            e = StepEstimate("", "EDA / report", 0, 0, 1, 0.05, note="minutes; not timed")
        e.step = name
        out.append(e)
    return out


def exported_steps(todo: list) -> list[dict]:
    """The training steps whose best.pt the plan's inference step lists (the exported
    ensemble); every training step when it lists none."""
    listed = {str(c) for _, _, nb, p in todo if nb.name.startswith("04_")
              for c in p.get("checkpoints") or []}
    steps = [p for _, _, nb, p in todo if nb.name.startswith("03_")]
    return [p for p in steps if not listed or f"{p['out']}/best.pt" in listed]


def _estimate_inference(params: dict, train_steps: list[dict], gpu: str,
                        rates: dict | None = None) -> StepEstimate:
    """04: the test images decoded once per checkpoint's input size, every checkpoint (with the
    flip when the step asks for it, else as the ensemble validated: its training steps' tta) run
    on them; the hidden test set's size when the plan's test.csv is not at hand. With several
    GPUs (`GPU_COUNT`) and the step's `shards` auto or N, the models' time is shared by
    min(N, GPUs) processes; the reading of the DICOMs is not (the box's cores do it for all)."""
    csv = params.get("csv")
    n = len(pd.read_csv(csv)) if csv and Path(csv).is_file() else HIDDEN_TEST_IMAGES
    ckpts = {str(c) for c in params.get("checkpoints") or []} if not params.get("ensemble") else set()
    seconds = n / preprocess_img_s(gpu)
    used = [p for p in train_steps if not ckpts or f"{p['out']}/best.pt" in ckpts]
    if "tta" in params:
        flip = params["tta"] is not False
    else:                     # the ensemble submits as it validated
        flip = any(p.get("tta", False) for p in used)
    devices = inference_devices(params.get("shards", 1), gpu)
    for p in used:
        size = tuple(parse_size(p["size"], MIN_MODEL_SIDE))
        inf = (rates[(p["model"], size)][1] if rates and (p["model"], size) in rates
               else throughput(p["model"], size, gpu)[1])
        # the input is decoded once and already on the device: the model's own ceiling
        seconds += n * (2 if flip else 1) / inf / devices
    return StepEstimate("", f"inference, {len(used)} checkpoints" +
                        (" with the flip" if flip else " without the flip") +
                        (f", on {devices} GPUs (a process each)" if devices > 1 else ""), n, 0, 1,
                        seconds / 3600, note=f"{n:,} test images, decoded once")


def inference_devices(shards, gpu: str) -> int:
    """GPUs an inference step uses on `gpu`: its `shards` (auto: all of them, N: at most N)."""
    from rsna_utils.infer.shard import SHARDS_AUTO, parse_shards
    n = GPU_COUNT.get(gpu, 1)
    shards = parse_shards(shards)
    return n if shards == SHARDS_AUTO else min(shards, n)


def check_budget(rows: list[StepEstimate], budget_hours: float | None, plan: str,
                 gpu: str = "h100") -> str:
    """One line: the plan's hours against its budget; RsnaError naming both and the fix when
    over."""
    total = sum(r.hours for r in rows)
    if not budget_hours:
        return f"plan {plan}: {total:.1f} h on {gpu_name(gpu)} (no budget set)"
    if total > budget_hours:
        raise RsnaError(f"plan {plan}: {total:.1f} h on {gpu_name(gpu)}, over its budget of "
                        f"{budget_hours:g} h; nothing was run: lower the longest steps' epochs "
                        "(-p STEP.epochs=N), run a shorter variant (--variant), or raise "
                        "--budget-hours")
    return (f"plan {plan}: {total:.1f} h on {gpu_name(gpu)}, within its budget of "
            f"{budget_hours:g} h")


def table(rows: list[StepEstimate], gpu: str = "h100", assumptions: list[str] | None = None) -> str:
    speed, gib, cores = GPUS[gpu]
    lines = [f"| step | what | images an epoch | batches an epoch | epochs | hours on {gpu_name(gpu)} "
             f"| memory (GiB, of {gib}) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "" if r.memory_gib is None else (f"{r.memory_gib:.1f}" + (" (over!)" if r.memory_gib > gib * 0.9 else ""))
        lines.append(f"| {r.step} | {r.what} | {r.images:,} | {r.batches:,} | {r.epochs} | "
                     f"{r.hours:.2f} | {mem} |")
    total = sum(r.hours for r in rows)
    lines.append(f"| **all** | | | | | **{total:.1f}** | |")
    lines.append("")
    lines += [f"- {r.step}: {r.note}" for r in rows if r.note and r.what.startswith("train")]
    lines.append(f"\nAssumed: each training step at the lower of the GPU's ceiling (timm on random "
                 f"input, the H200 anchors, or the rates --calibrate measured) and its workers' "
                 f"rate ({WORKER_MS_PER_MPIX:.1f} ms a megapixel of PNG per worker, "
                 f"+{HEAVY_MS_PER_MPIX:.1f} ms a megapixel of input for the heavy augmentation, "
                 f"measured on a 2-core CPU; at most {cores - 1} workers); {'each' if gpu in GPU_COUNT else 'one'} {gpu.upper().replace('X2', '')} at "
                 f"{speed:.2g} of an H200 (an assumption from its specifications), DICOM reading at "
                 f"{preprocess_img_s(gpu):.1f} img/s; the hidden test set {HIDDEN_TEST_IMAGES:,} "
                 "images (8,000 patients x 4.59); memory is a floor (activations measured at "
                 "256x128 under bf16 autocast on the CPU and scaled, plus weights, gradients, "
                 "AdamW and the EMA; about twice the 1st place's ConvNeXt at batch 8 on 40 GB).")
    lines += [f"- {a}" for a in assumptions or []]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Calibration: the training steps' rates measured on the machine at hand
# ----------------------------------------------------------------------------------------

@dataclass
class Calibration:
    model: str
    size: tuple[int, int]
    batch: int
    train_img_s: float
    infer_img_s: float
    peak_gib: float | None
    first_loss: float
    last_loss: float
    device: str


def calibrate_step(params: dict, steps: int = 200, warmup: int = 5,
                   device: str | None = None) -> Calibration:
    """`steps` optimiser steps of one training step's model at its size, batch, precision,
    channels_last, EMA and torch.compile setting, on random uint8 input made on the device
    (the ceiling any data pipeline can reach), after `warmup` untimed steps; then the
    inference rate on as many batches. Random weights: the speed does not depend on them."""
    import contextlib
    import io
    import time

    import torch

    from rsna_utils.learn.data import device_input
    from rsna_utils.learn.train import create_optimisation, create_train_model
    from rsna_utils.learn.train_config import TrainConfig
    cfg = TrainConfig.from_dict({**params, "pretrained_path": None, "resume": False,
                                 **({"device": device} if device else {})})
    dev = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available()
                       else "cpu")
    if cfg.level != "image":
        raise RsnaError(f"calibrate: level {cfg.level!r} is timed from the anchors; calibrate "
                        "measures image-level steps")
    size = tuple(parse_size(cfg.size, MIN_MODEL_SIDE))
    with contextlib.redirect_stderr(io.StringIO()):     # "training from random weights": meant
        model, forward = create_train_model(cfg, dev, 0, 0, 1)
    opt = create_optimisation(cfg, model, steps, dev)
    if cfg.compile:
        forward = torch.compile(forward)
    b, k = cfg.batch_size, 1 + len(cfg.aux)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    norm = ((0.5,) * 3, (0.25,) * 3)

    def batch():
        raw = torch.randint(0, 256, (b, 1, *size), generator=gen, device=dev, dtype=torch.uint8)
        y = torch.full((b, k), float("nan"), device=dev)
        y[:, 0] = 0
        y[0, 0] = 1                                   # one positive a batch, as the plan's sampler
        return device_input(raw, None, norm, cfg.channels, cfg.channels_last), y

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    losses = []
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        x, y = batch()
        with torch.autocast(dev.type, dtype=opt.dtype, enabled=opt.dtype is not None):
            loss = opt.loss_fn(forward(x), y)
        (opt.scaler.scale(loss) if opt.scaler else loss).backward()
        if opt.scaler:
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
        else:
            opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update_parameters(model)
        if i == warmup or i == warmup + steps - 1:
            losses.append(float(loss.detach()))
    sync()
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=opt.dtype, enabled=opt.dtype is not None):
        x, _ = batch()
        model(x)
        sync()
        t1 = time.perf_counter()
        n_inf = max(1, steps // 2)
        for _ in range(n_inf):
            model(batch()[0])
        sync()
        infer_s = time.perf_counter() - t1
    if not all(math.isfinite(v) for v in losses):
        raise RsnaError(f"calibrate {cfg.model} {size[0]}x{size[1]}: the loss is not finite "
                        f"({losses}); check the precision (amp) and the learning rate")
    return Calibration(cfg.model, size, b, steps * b / train_s, n_inf * b / infer_s, peak,
                       losses[0], losses[-1], str(dev if dev.type == "cpu"
                                                  else torch.cuda.get_device_name(dev)))


def calibrate_plan(plan: str | Path, data: str | Path = "data/synthetic", steps: int = 200,
                   device: str | None = None, progress: bool = True, **kw) -> list[Calibration]:
    """Each distinct (model, size) of the plan's training steps timed once (`calibrate_step`)."""
    from rsna_utils.app.notebooks import plan_steps
    _, _, todo, _ = plan_steps(plan, data, **kw)
    seen, out = set(), []
    for _, name, nb, params in todo:
        if not nb.name.startswith("03_") or params.get("level", "image") != "image":
            continue
        key = (params["model"], tuple(parse_size(params["size"], MIN_MODEL_SIDE)))
        if key in seen:
            continue
        seen.add(key)
        if progress:
            import sys
            print(f"calibrating {name}: {steps} steps of {key[0]} at {key[1][0]}x{key[1][1]}",
                  file=sys.stderr, flush=True)
        out.append(calibrate_step(params, steps, device=device))
    return out


def calibration_table(cals: list[Calibration]) -> str:
    lines = ["| model | input | batch | train img/s | inference img/s | peak GiB | loss first -> last "
             "| device |", "|---|---|---|---|---|---|---|---|"]
    for c in cals:
        peak = "" if c.peak_gib is None else f"{c.peak_gib:.1f}"
        lines.append(f"| {c.model} | {c.size[0]}x{c.size[1]} | {c.batch} | {c.train_img_s:.1f} | "
                     f"{c.infer_img_s:.1f} | {peak} | {c.first_loss:.3f} -> {c.last_loss:.3f} | "
                     f"{c.device} |")
    return "\n".join(lines)


def measured_rates(cals: list[Calibration]) -> dict:
    return {(c.model, c.size): (c.train_img_s, c.infer_img_s) for c in cals}
