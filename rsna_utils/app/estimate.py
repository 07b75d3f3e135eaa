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

The pieces live in their own modules and are re-exported here, so `rsna_utils.app.estimate`
keeps every name it had: the measured rates and memory (`app.throughput`) and the calibration
on the machine at hand (`app.calibration`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.app.calibration import (  # noqa: F401
    Calibration, calibrate_plan, calibrate_step, calibration_table, measured_rates)
from rsna_utils.app.throughput import (  # noqa: F401
    DECODE_CEILING_IMG_S, GPU_COUNT, GPUS, H200_ANCHORS, HEAVY_MS_PER_MPIX, PNG_SIZE,
    PREPROCESS_IMG_S, WORKER_MS_PER_MPIX, activation_bytes, gpu_name, parameter_count,
    preprocess_img_s, throughput, training_memory_gib, worker_img_s)
from rsna_utils.core.errors import RsnaError
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size

# the competition's train.csv when the plan's data is not at hand (RSNA_DATA.md)
COMPETITION = dict(images=54_706, positives=1_158)
# its breasts (patient_id x laterality): 23,826, 492 with cancer, by the views each has (2.30
# on average, up to 8), counted from train.csv
COMPETITION_BREASTS = dict(breasts=23_826, positives=492)
COMPETITION_VIEWS = {2: 18_384, 3: 4_227, 4: 904, 5: 239, 6: 60, 7: 10, 8: 2}
# steps drawn to find a breast-level step's most images (memory): enough for the rare 5-8 view
# breasts to meet in one batch as often as a run's epochs would let them
PEAK_STEPS = 20_000
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


def _labels(csv: str | Path | None) -> tuple[np.ndarray, pd.DataFrame | None, str]:
    if csv and Path(csv).is_file():
        df = pd.read_csv(csv)
        if "cancer" in df:
            return df.cancer.to_numpy(), df, str(csv)
    n, pos = COMPETITION["images"], COMPETITION["positives"]
    return np.r_[np.ones(pos), np.zeros(n - pos)], None, (
        f"the competition's train.csv ({n:,} images, {pos:,} positive; {csv} not found)")


def _breasts(df: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """(label, views) per breast: from the plan's train.csv when at hand, else the
    competition's counts."""
    if df is not None:
        g = df.groupby(["patient_id", "laterality"]).cancer
        return g.max().to_numpy(), g.size().to_numpy()
    views = np.repeat(list(COMPETITION_VIEWS), list(COMPETITION_VIEWS.values()))
    labels = np.zeros(len(views))
    labels[:COMPETITION_BREASTS["positives"]] = 1        # the split is drawn at random
    return labels, views


def step_images(views: np.ndarray, breast_views: str, batch: int,
                steps: int = PEAK_STEPS, seed: int = 0) -> tuple[float, int, int]:
    """(mean, most, widest) images of a breast-level training step: `batch` breasts drawn at
    random from breasts of `views` views each, read as `breast_views` says
    (`breast.BreastDataset`: all, 2, or random 1 to all). The backbone runs on the views
    present: their mean sizes the time and their most over `steps` drawn steps the
    activations; a batch is padded to its breast of most views (`breast.collate_breasts`), so
    its input holds batch x that many view slots, the widest of which is the third figure."""
    from rsna_utils.learn.breast import training_views
    rng = np.random.default_rng(seed)
    n = np.asarray(views)[rng.integers(len(views), size=(steps, batch))]
    read = (rng.integers(1, n + 1) if breast_views == "random"
            else training_views(n, breast_views).astype(int))
    return (float(training_views(views, breast_views).mean() * batch), int(read.sum(1).max()),
            int(read.max(1).max()) * batch)


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
    breast = cfg.level == "breast"
    views = val_views = 1.0                  # images an item, in training and in validation
    if breast:                               # an item is a breast: its views (breast_views)
        from rsna_utils.learn.breast import training_views
        labels, counts = _breasts(df)
        views = float(training_views(counts, cfg.breast_views).mean())
        val_views = float(counts.mean())
        source += "; per breast"
    check_ratio(labels, cfg.target_ratio, cfg.min_positives, cfg.batch_size, cfg.upsample)
    n = len(labels)
    val_share = (1 / cfg.folds) if cfg.split == "kfold" else cfg.val_frac
    rng = np.random.default_rng(0)
    train_labels = labels[rng.random(n) >= val_share]       # the patient split, in expectation
    b = balance(train_labels, cfg.upsample, cfg.target_ratio, cfg.batch_size, cfg.min_positives,
                cfg.pos_weight, cfg.neg_weight, cfg.seed)
    size = tuple(parse_size(cfg.size, MIN_MODEL_SIDE))
    # other sources' images become breasts of the views a breast has, each read with `views`
    epoch_items = b.epoch_images + int(round(extra_images / val_views))
    if rates and (cfg.model, size) in rates:
        tr, inf = rates[(cfg.model, size)]
        src = f"{cfg.model} @{size[0]}x{size[1]} measured here (--calibrate)"
    else:
        tr, inf, src = throughput(cfg.model, size, gpu)
    feed = worker_img_s(cfg.workers, size, gpu, cfg.aug_level if cfg.augment else None, png_size)
    feed_val = worker_img_s(cfg.workers, size, gpu, None, png_size)
    train_rate, val_rate = min(tr, feed), min(inf, feed_val)
    bound = "GPU-bound" if tr <= feed else f"input-bound ({cfg.workers} workers)"
    val_images = int(round(n * val_share * val_views))
    seconds = cfg.epochs * (epoch_items * views / train_rate
                            + val_images * (2 if cfg.tta else 1) / val_rate)
    step, unit, how = cfg.batch_size, "", ""
    padded = 0.0               # GiB of float input in the padded view slots of the widest batch
    if breast:                 # the memory of the step with the most views, not the mean one
        mean_step, step, slots = step_images(counts, cfg.breast_views, cfg.batch_size)
        padded = slots * cfg.channels * size[0] * size[1] * 4 / 2**30
        unit = " breasts"
        how = (f"; {views:.2f} views a breast (breast_views {cfg.breast_views}): "
               f"{mean_step:.1f} images a step on average; memory for the most, {step}, and "
               f"the float input of the widest batch, {slots} view slots ({padded:.2f} GiB)")
    mem = (training_memory_gib(cfg.model, size, step, bool(cfg.ema or cfg.ema_epochs),
                               cfg.global_pool, cfg.drop_path) + padded
           if memory else None)
    more = f"; {extra_images:,.0f} source images an epoch" if extra_images else ""
    return StepEstimate("", f"train {cfg.model} {size[0]}x{size[1]} batch {cfg.batch_size}{unit}",
                        int(round(epoch_items * views)), math.ceil(epoch_items / cfg.batch_size),
                        cfg.epochs, seconds / 3600, mem,
                        f"{src}; {train_rate:.0f} img/s, {bound}; labels: {source}{more}{how}")


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
    min(N, GPUs) processes; the reading of the DICOMs is not (the box's cores do it for all).
    `runtime` onnx or tensorrt is timed as eager PyTorch, and says so: neither has been measured
    on a GPU (BENCHMARKS.md "Exported engine" is the CPU's), and a member they cannot run stays
    in PyTorch."""
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
    from rsna_utils.infer.engine import EXPORTED_RUNTIMES
    exported = params.get("runtime") if params.get("runtime") in EXPORTED_RUNTIMES else None
    return StepEstimate("", f"inference, {len(used)} checkpoints" +
                        (" with the flip" if flip else " without the flip") +
                        (f", on {devices} GPUs (a process each)" if devices > 1 else "") +
                        (f", runtime {exported} timed as eager PyTorch (not measured on a GPU)"
                         if exported else ""), n, 0, 1,
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
