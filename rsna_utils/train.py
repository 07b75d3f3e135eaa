"""Training: `train(TrainConfig)` reads top to bottom as setup, data, model, then
`train_one_epoch` / `evaluate` per epoch, with checkpoints, metrics files and resume.
Runs single-process or under `torchrun --nproc_per_node N` (DDP; RANK / WORLD_SIZE /
LOCAL_RANK from the environment)."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.errors import RsnaError


@dataclass
class TrainConfig:
    data: str = "data/png"                  # folder of preprocessed PNGs (rsna preprocess --out)
    csv: str = "data/synthetic/train.csv"
    out: str = "runs/train"
    model: str = "resnet18"
    size: int | list | str = 256            # int, [height, width] or "HEIGHTxWIDTH" (e.g. 1536x768)
    channels: int = 3
    epochs: int = 2
    batch_size: int = 16
    accumulate: int = 1                     # gradient accumulation steps
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    pos_weight: float = 1.0                 # w_pos of the weighted BCE
    neg_weight: float = 1.0
    upsample: float = 1.0                   # each positive this many times per epoch (> 1 wins)
    # positives repeated until they make up this share of each epoch (never fewer): about 5x
    # on the real 2% RSNA data, nothing on a balanced set; used when upsample is 1
    target_ratio: float | None = 0.1
    split: str = "holdout"                  # holdout | kfold
    val_frac: float = 0.15
    folds: int = 5
    fold: int = 0
    seed: int = 42
    workers: int = 2
    pretrained_path: str | None = None
    global_pool: str = "gem"                # gem (default: small lesions) | avg | max | avgmax | catavgmax
    drop_path: float = 0.0                  # stochastic depth rate (timm drop_path_rate)
    ema: float = 0.0                        # EMA decay (e.g. 0.999); 0 = off
    select_by: str = "auc"                  # best.pt by breast auc | pr_auc | pf1
    aux: list = field(default_factory=list) # auxiliary targets, e.g. [BIRADS, density, view]
    aux_weight: float = 0.1                 # their loss weight against the cancer loss
    amp: str = "auto"                       # auto (bf16/fp16 on GPU) | bf16 | fp16 | off
    channels_last: bool = True
    cache: bool = False                     # keep decoded PNGs in memory
    # off by default: on 150 synthetic patients x 6 epochs it held breast AUC at 0.85 (0.93
    # without); long runs on real data turn it on (the kaggle plan does)
    augment: bool = False
    random_crop: float = 0.0
    device: str = "auto"                    # auto | cpu | cuda
    resume: bool = False
    max_steps: int | None = None            # stop each epoch early (smoke tests)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RsnaError(f"unknown training option(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        import yaml
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RsnaError(f"{path}: config file not found") from None
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)


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


def amp_dtype(cfg: TrainConfig, device):
    import torch
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp in ("bf16", "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise RsnaError(f"amp={cfg.amp!r}: choose auto, bf16, fp16 or off")


def make_split(df: pd.DataFrame, cfg: TrainConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-grouped split, saved to out/splits.csv (reused on resume)."""
    from rsna_utils.data import check_split, holdout_split, patient_folds
    path = out / "splits.csv"
    if path.exists() and cfg.resume:
        s = pd.read_csv(path)
        df = df.merge(s[["image_id", "fold"]], on="image_id", how="left")
    else:
        df = df.copy()
        df["fold"] = (holdout_split(df, cfg.val_frac, cfg.seed) if cfg.split == "holdout"
                      else patient_folds(df, cfg.folds, cfg.seed))
        df[["patient_id", "image_id", "fold"]].to_csv(path, index=False)
    val_fold = 1 if cfg.split == "holdout" else cfg.fold
    if cfg.split not in ("holdout", "kfold"):
        raise RsnaError(f"split={cfg.split!r}: choose holdout or kfold")
    if cfg.split == "kfold" and not 0 <= cfg.fold < cfg.folds:
        raise RsnaError(f"fold={cfg.fold}: choose 0..{cfg.folds - 1}")
    train, val = df[df.fold != val_fold].reset_index(drop=True), df[df.fold == val_fold].reset_index(drop=True)
    check_split(train, val, f"{cfg.split} split (fold {val_fold}) of {cfg.csv}")
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

def cancer_logit(out):
    """The cancer logit of a model's output: (N,) or column 0 of (N, 1 + aux)."""
    out = out.float()
    return out[:, 0] if out.ndim == 2 else out.view(-1)


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
                    epoch: int, dtype=None, scaler=None, ema=None, rank: int = 0) -> dict:
    import torch
    from tqdm.auto import tqdm
    model.train()
    n_seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not cfg.progress or rank != 0,
               file=sys.stderr, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        x = x.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
        n_seen += len(x)
        loss_sum += float(loss.detach()) * cfg.accumulate * len(x)
        bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}",
                        img_s=f"{n_seen / (time.perf_counter() - t0):.1f}")
    bar.close()
    dt = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(1, n_seen), "train_images": n_seen,
            "train_img_s": n_seen / dt if dt else 0.0, "lr": optimizer.param_groups[0]["lr"]}


def predict_loader(model, loader, device, dtype=None, channels_last: bool = True,
                   tta_flip: bool = False) -> np.ndarray:
    """Sigmoid probabilities for every item of the loader, in order."""
    import torch
    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                p = torch.sigmoid(cancer_logit(model(x)))
                if tta_flip:
                    p = (p + torch.sigmoid(cancer_logit(model(torch.flip(x, dims=[3]))))) / 2
            out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(model, loader, val_df: pd.DataFrame, device, dtype=None,
             channels_last: bool = True) -> tuple[dict, pd.DataFrame]:
    from rsna_utils.metrics import evaluate as metrics
    preds = predict_loader(model, loader, device, dtype, channels_last)
    df = val_df.assign(prediction=preds)
    return metrics(df), df


# ----------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train one model; returns the best epoch's metrics. Files under cfg.out: config.json,
    splits.csv, metrics.csv/json, val_predictions.csv, last.pt, best.pt."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from rsna_utils.data import Augment, PngDataset, UpsampleSampler, load_table, worker_init
    from rsna_utils.models import (WeightedBCE, create_model, load_weights, save_checkpoint,
                                   set_outputs)

    rank, world, local_rank = distributed_env()
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(cfg.size)
    if cfg.select_by not in ("auc", "pr_auc", "pf1"):
        raise RsnaError(f"select_by={cfg.select_by!r}: choose auc, pr_auc or pf1")
    preprocess = _preprocess_config(Path(cfg.data))
    norm = _input_norm(cfg.model)

    # data
    table = load_table(cfg.csv, cfg.data)
    if "cancer" not in table:
        raise RsnaError(f"{cfg.csv}: no 'cancer' column; training needs labels (train.csv)")
    aux = [a.strip() for a in cfg.aux.split(",")] if isinstance(cfg.aux, str) else list(cfg.aux or [])
    if aux:
        from rsna_utils.data import aux_targets
        aux_targets(table, aux, str(cfg.csv))     # a missing column: one clear line, nothing written
    train_df, val_df = make_split(table, cfg, out)
    aug = Augment(random_crop=cfg.random_crop) if cfg.augment else None
    train_ds = PngDataset(train_df, size, cfg.channels, aug, cfg.seed, cfg.cache, norm=norm,
                          aux=aux)
    val_ds = PngDataset(val_df, size, cfg.channels, None, cfg.seed, cfg.cache, norm=norm)
    sampler = UpsampleSampler(train_ds.labels, cfg.seed, cfg.upsample,
                              cfg.target_ratio if cfg.upsample == 1.0 else None, rank, world)
    pin = device.type == "cuda"
    loader_kw = dict(num_workers=cfg.workers, pin_memory=pin,
                     persistent_workers=cfg.workers > 0 and not cfg.cache,
                     multiprocessing_context="forkserver" if cfg.workers > 0 else None,
                     worker_init_fn=worker_init if cfg.workers > 0 else None)
    train_dl = DataLoader(train_ds, cfg.batch_size, sampler=sampler, drop_last=False, **loader_kw)
    val_dl = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, **loader_kw)

    # model
    model = create_model(cfg.model, cfg.channels, cfg.pretrained_path,
                         global_pool=cfg.global_pool, drop_path=cfg.drop_path).to(device)
    if aux:
        set_outputs(model, 1 + len(aux))          # logit 0: cancer; then one per aux target
    if rank == 0 and getattr(model, "pretrained_report", None):
        print(model.pretrained_report, file=sys.stderr)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    loss_fn = CancerAuxLoss(WeightedBCE(cfg.pos_weight, cfg.neg_weight), cfg.aux_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(min(len(train_dl), cfg.max_steps or 10**9) / cfg.accumulate))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        # use_buffers: BatchNorm running statistics are averaged too, not left at their start
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

    start, best, history = 0, None, []
    last = out / "last.pt"
    for stale in out.glob(".*.pt.tmp*"):       # a checkpoint write cut by a kill
        stale.unlink(missing_ok=True)
    if cfg.resume and last.exists():
        ck = load_weights(last)
        try:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if ema is not None and ck.get("ema"):
                ema.load_state_dict(ck["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise RsnaError(f"{last}: cannot resume from it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); delete it to start over") from None
        start, best, history = int(ck["epoch"]) + 1, ck.get("best"), list(ck.get("history", []))
    if rank == 0:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        row = {"epoch": epoch}
        row.update(train_one_epoch(ddp, train_dl, loss_fn, optimizer, scheduler, device, cfg,
                                   epoch, dtype, scaler, ema, rank))
        if rank == 0:
            eval_model = ema.module if ema is not None else model
            m, preds = evaluate(eval_model, val_dl, val_df, device, dtype, cfg.channels_last)
            row.update(m)
            history.append(row)
            # threshold-free first: pF1 of raw probabilities mostly measures calibration
            score = selection_score(m, cfg.select_by)
            # rebuilt from the stored metrics: a resumed run may select by another measure, and
            # older checkpoints stored (pF1, AUC)
            improved = best is None or score > selection_score(best.get("metrics", {}), cfg.select_by)
            state = {   # last.pt: the live weights and the EMA apart (resume needs both)
                "model": _state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                "epoch": epoch, "config": asdict(cfg), "preprocess": preprocess,
                "model_name": cfg.model, "channels": cfg.channels, "size": size,
                "global_pool": cfg.global_pool, "norm": [list(norm[0]), list(norm[1])], "aux": aux,
                "threshold": m["breast_mean_best_threshold"], "metrics": _plain(m),
                "prior": float(train_df.groupby("prediction_id").cancer.max().mean()),
                "history": [_plain(h) for h in history],
            }
            if improved:
                best = {"epoch": epoch, "score": list(score), "metrics": _plain(m)}
            state["best"] = best
            if improved:   # best.pt: the weights that were evaluated (the EMA when on)
                save_checkpoint({**{k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "ema")},
                                 "model": _state(eval_model)}, out / "best.pt")
                preds.to_csv(out / "val_predictions.csv", index=False)
            save_checkpoint(state, last)
            pd.DataFrame(history).to_csv(out / "metrics.csv", index=False)
            (out / "metrics.json").write_text(json.dumps([_plain(h) for h in history], indent=2))
            print(f"epoch {epoch}: loss {row['train_loss']:.4f}, breast pF1 {m['breast_mean_pf1']:.3f}, "
                  f"breast AUC {m['breast_mean_auc']:.3f}, {row['train_img_s']:.1f} img/s"
                  + (" (best)" if improved else ""), file=sys.stderr)
        if world > 1:
            dist.barrier()
    if os.environ.get("RSNA_WRITE_RANK_DIGEST"):
        (out / f"weights_rank{rank}.txt").write_text(_digest(model))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return best or {}


def selection_score(m: dict, select_by: str) -> tuple:
    """What picks best.pt: the chosen breast-level measure, then PR-AUC, then AUC."""
    key = {"auc": "breast_mean_auc", "pr_auc": "breast_mean_pr_auc", "pf1": "breast_mean_pf1"}
    return (_nan0(m.get(key[select_by])), _nan0(m.get("breast_mean_pr_auc")),
            _nan0(m.get("breast_mean_auc")))


def parse_size(size) -> list[int]:
    """256, [h, w], (h, w) or "HxW" -> [h, w]; a clear error for anything else."""
    if isinstance(size, str):
        parts = size.lower().replace(" ", "").split("x")
        try:
            size = [int(p) for p in parts] if len(parts) == 2 else int(parts[0])
        except ValueError:
            raise RsnaError(f"size {size!r}: give 512 or HEIGHTxWIDTH, e.g. 1536x768") from None
    if isinstance(size, int):
        size = [size, size]
    size = [int(v) for v in size]
    if len(size) != 2 or min(size) < 32:
        raise RsnaError(f"size {size}: give 512 or HEIGHTxWIDTH with both sides >= 32")
    return size


def _input_norm(model_name: str):
    """The backbone's pretrained mean / std (timm's config), stored in the checkpoint."""
    try:
        from rsna_utils.models import input_norm
    except ImportError:
        from rsna_utils.data import DEFAULT_NORM
        return DEFAULT_NORM
    return input_norm(model_name)


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


def _preprocess_config(data: Path) -> dict:
    p = data / "preprocess.json"
    if p.exists():
        return json.loads(p.read_text())
    return {}
