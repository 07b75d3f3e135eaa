"""Calibration (`rsna notebooks --calibrate`): the training steps' rates and memory measured on
the machine at hand (`calibrate_step`, `calibrate_plan`), in place of the H200 anchors of
`app.throughput`; `measured_rates` hands them to `estimate_plan`. Moved out of `app.estimate`,
which re-exports them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size


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
    from rsna_utils.learn.optim import create_optimisation
    from rsna_utils.learn.train_config import TrainConfig
    from rsna_utils.learn.train_setup import create_train_model
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
