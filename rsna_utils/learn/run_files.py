"""What a training run keeps in its folder: the files it leaves (`RUN_FILES`), each epoch's
checkpoint state and tables (`epoch_state`, `save_epoch`: last.pt, best.pt, metrics.csv/json,
val_predictions.csv), and `resume` from last.pt. Moved out of `learn.train`, which re-exports
them."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic, writing
from rsna_utils.learn.checkpoint import Checkpoint
from rsna_utils.learn.optim import Optimisation
from rsna_utils.learn.train_config import TrainConfig


# what a run leaves in its folder: one of them there means a run was made (and kept) there
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "metrics.json", "val_predictions.csv")


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
    before = (state.config or {}).get("breast_views", "2")    # 2 until 2026-12-07
    if cfg.level == "breast" and before != cfg.breast_views:    # said, not refused
        print(f"resume: {last} trained with breast_views {before}; the rest of the run reads "
              f"{cfg.breast_views} (a step's images, time and memory change with it); "
              f"--breast-views {before} continues as it trained", file=sys.stderr, flush=True)
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


def _state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _plain(d: dict) -> dict:
    """Only str/int/float/bool/None: checkpoints must load with weights_only=True."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out
