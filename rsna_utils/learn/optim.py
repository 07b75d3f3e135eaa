"""Optimisation of a training run: the loss (`CancerAuxLoss`), AdamW with its parameter groups
and warmup + cosine schedule, mixed precision (`amp_dtype`) and the EMA of the weights, gathered
in `Optimisation` by `create_optimisation`. Moved out of `learn.train`, which re-exports them."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.checkpoint import cancer_logit
from rsna_utils.learn.device import half_dtype
from rsna_utils.learn.train_config import TrainConfig


def amp_dtype(cfg: TrainConfig, device):
    import torch
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp in ("bf16", "auto"):
        return half_dtype(device)
    raise RsnaError(f"amp={cfg.amp!r}: choose auto, bf16, fp16 or off")


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


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
