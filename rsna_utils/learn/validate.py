"""Validation during training: a batch onto the device as the model's input (`_to_device`),
predictions over a loader (`predict_loader`), the validation pass shared by the ranks under DDP
(`validate`) and its metrics (`val_metrics`, `evaluate`). Moved out of `learn.train`, which
re-exports them."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from rsna_utils.learn.checkpoint import cancer_probability
from rsna_utils.learn.train_config import TrainConfig


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
