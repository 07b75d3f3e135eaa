"""Training: `train(TrainConfig)` reads top to bottom as its phases: setup, the model contract
(what the checkpoint tells inference), data, model, optimisation, resume, then per epoch
`train_one_epoch` / `evaluate` and the checkpoints (`epoch_state`, `save_epoch`). Runs
single-process or under `torchrun --nproc_per_node N` (DDP; RANK / WORLD_SIZE / LOCAL_RANK
from the environment). `TrainConfig` is the one place a training setting is spelled: the
`rsna train` flags, `--config` YAML, notebook 03 and the plans derive from its fields.

The phases' pieces live in their own modules and are re-exported here, so
`rsna_utils.learn.train` keeps every name it had: setup and teardown, the split and the
loaders, the model (`learn.train_setup`), the loss, optimiser, schedule, precision and EMA
(`learn.optim`), the validation pass (`learn.validate`), the choice of best.pt
(`learn.selection`), and the run's files and resume (`learn.run_files`)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rsna_utils.core.errors import RsnaError, write_atomic, writing  # noqa: F401
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size  # noqa: F401 - names train had
from rsna_utils.learn.checkpoint import (  # noqa: F401 - names train had
    Checkpoint, cancer_logit, cancer_probability, model_contract)
from rsna_utils.learn.device import half_dtype, resolve_device  # noqa: F401
# the run's phases live in their own modules and are re-exported here, so
# `rsna_utils.learn.train` keeps every name it had; `train` looks them up in this module
from rsna_utils.learn.optim import (  # noqa: F401
    CancerAuxLoss, Optimisation, amp_dtype, create_optimisation, ema_decay, ema_from_epochs,
    ema_update, lr_lambda, param_groups)
from rsna_utils.learn.run_files import (  # noqa: F401
    RESUME_FREE, RESUME_INPUT, RUN_FILES, _plain, _state, epoch_state, resume, save_epoch)
from rsna_utils.learn.selection import (  # noqa: F401
    _nan0, full_window, selection_score, update_best)
from rsna_utils.learn.train_config import SELECT_BY, TrainConfig  # noqa: F401
from rsna_utils.learn.train_setup import (  # noqa: F401
    SCRATCH_NOTE, TrainData, _digest, check_inputs, check_run_folder, create_train_model,
    distributed_env, load_data, make_split, seed_everything, setup, teardown)
from rsna_utils.learn.validate import (  # noqa: F401
    _to_device, evaluate, predict_loader, val_metrics, validate)

# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------

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
