"""The loaded ensemble: its members on a device, their weights, the preprocessing they share,
and the settings that turn their scores into a submission (flip TTA, views -> breast
aggregation, the cut, the calibrator). `LoadedEnsemble` is built once, from checkpoints or
from an `ensemble.json` (`infer.ensemble.Ensemble`, the file format), and every step that
scores images takes it: `rsna predict` (`predict.py`), its shards (`shard_job.py`), `rsna
explain` and the heatmaps (`reports/`), the real-data benchmark.

`score_images` streams test DICOMs through in-memory preprocessing (DataLoader workers, or the
GPU decoders) and the members; `score_breasts` pools the views per breast; `cut` makes the
submission's column (`infer.cut`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import dicom_path
from rsna_utils.infer.engine import EXPORTED_RUNTIMES, attach_engines
from rsna_utils.infer.ensemble import exported_recipe
from rsna_utils.infer.ensemble import recipe_weights as ensemble_recipe_weights
from rsna_utils.learn.checkpoint import DEFAULT_PRIOR, LoadedModel, load_checkpoints
from rsna_utils.learn.data import raw_batch


@dataclass
class LoadedEnsemble:
    """Members loaded on `device` (`LoadedModel`, each with its recipe and the recipe's vote),
    the preprocessing they share (`pre`, a `PreprocessConfig`'s fields), and what a submission
    makes of their scores. `threshold_given` None: the members' validation thresholds averaged
    as their scores are (`threshold`)."""

    models: list
    pre: dict
    device: object
    tta: bool = False
    agg: str = "mean"
    threshold_given: float | None = None
    binarize_how: str | None = None
    oof_rate: float | None = None
    cut_fallback: bool = True
    calibrator: dict | None = None
    source: str = ""
    settings: dict = field(default_factory=dict)   # what ensemble.json decided (from_json)

    @classmethod
    def from_checkpoints(cls, paths, device, recipe_weights: dict | None = None,
                         runtime: str = "torch", engines: str | None = None,
                         **settings) -> "LoadedEnsemble":
        """The members of `paths` (best.pt of `rsna train`, or an export's), each weighted by
        its recipe's vote (`recipe_weights`, ensemble.json's; None: equally), in eager PyTorch
        or (`runtime` "onnx", "tensorrt") through their exports where they run
        (`infer.engine`)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        models, pre = load_models(list(paths), device)
        if runtime in EXPORTED_RUNTIMES:
            attach_engines(models, device, engines, tensorrt=runtime == "tensorrt")
        set_recipe_weights(models, recipe_weights)
        return cls(models, pre, device, source=", ".join(map(str, paths))[:200], **settings)

    @classmethod
    def from_json(cls, path, device, runtime: str = "torch", engines: str | None = None,
                  checkpoints=None, **given) -> "LoadedEnsemble":
        """An exported ensemble (a folder or its ensemble.json, listing its checkpoints, or
        with `checkpoints` given instead of those), with the settings it decides
        (`Ensemble.predict_settings`) over those `given` by hand (threshold, agg, output,
        binarize_how, tta)."""
        from rsna_utils.infer.ensemble import ensemble_checkpoints, read_ensemble
        ens = read_ensemble(path)
        # the ones given, an export's own files, or the best.pt of the runs `rsna oof` merged
        checkpoints = checkpoints or ensemble_checkpoints(path)
        decided = ens.predict_settings(given, source=str(path))
        kw = {k: decided[k] for k in ("tta", "agg", "binarize_how", "oof_rate", "calibrator")
              if k in decided}
        out = cls.from_checkpoints(checkpoints, device,
                                   decided.get("member_weights"),
                                   runtime, engines, threshold_given=decided.get("threshold"),
                                   **kw)
        out.source, out.settings = str(path), decided
        return out

    # -- what the members say together --------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        """Each member's weight (`ensemble_weights`): per recipe, then the recipes' votes."""
        return ensemble_weights(self.models)

    def weighted_mean(self, attr: str) -> float:
        return weighted_mean(self.models, attr)

    @property
    def threshold(self) -> float:
        """The binary cut: the one given, else the members' validation thresholds averaged."""
        return (float(self.threshold_given) if self.threshold_given is not None
                else self.weighted_mean("threshold"))

    @property
    def prior(self) -> float:
        """The training prior, averaged: a breast none of whose views was read gets it."""
        return self.weighted_mean("prior")

    @property
    def channels(self) -> int:
        return self.models[0].channels

    @property
    def has_breast_members(self) -> bool:
        return any(m.level == "breast" for m in self.models)

    def preprocess_config(self):
        """The members' shared preprocessing as a `PreprocessConfig`."""
        from rsna_utils.image.convert import PreprocessConfig
        return PreprocessConfig(**{k: (tuple(v) if k == "size" else v)
                                   for k, v in self.pre.items()})

    def input_batch(self, imgs: list, m: LoadedModel):
        """Member `m`'s input batch (N, C, H, W) from preprocessed images (`batch_input`)."""
        return batch_input(imgs, m, self.channels, tuple(self.pre["size"]))

    # -- scoring ----------------------------------------------------------------------------
    def score_images(self, df: pd.DataFrame, images, batch_size: int = 16, workers: int = 2,
                     backend: str = "auto", progress: bool = True, tta: bool | None = None):
        """Per image of `df` (patient_id, image_id, prediction_id): (probabilities, NaN where
        unreadable; reasons; looks-inverted flags; breast members' attention, NaN without),
        the members averaged as `predict_images` averages them."""
        return predict_images(df, images, self.models, self.pre, self.device, batch_size,
                              workers, self.tta if tta is None else tta, backend,
                              self.channels, progress)

    def score_breasts(self, imgs: pd.DataFrame, agg: str | None = None) -> pd.DataFrame:
        """prediction_id, prediction: the views that could be read pooled per breast (mean or
        max), the prior where none could (`aggregate`)."""
        return aggregate(imgs, agg or self.agg, self.prior)

    def cut(self, values: np.ndarray, output: str, binarize_how: str | None = None,
            unread: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """The submission's column from the breast probabilities `values`, and for binary
        output what it flagged (`cut.binary_cut`, with this ensemble's fallback), else {}."""
        from rsna_utils.infer.cut import binary_cut, breast_output
        how = binarize_how if binarize_how is not None else self.binarize_how
        if output == "binary":
            return binary_cut(values, how, self.threshold, self.oof_rate, self.cut_fallback)
        return breast_output(values, output, how, self.threshold, self.calibrator,
                             unread=unread), {}


def load_models(paths: list[str | Path], device) -> tuple[list[LoadedModel], dict]:
    """The members' models and their shared preprocessing (`checkpoint.load_checkpoints`),
    each keyed by its training recipe: its run's config.json, else what an exported
    ensemble.json beside it recorded, else the settings stored in it."""
    return load_checkpoints(paths, device, exported=exported_recipe)


def ensemble_weights(models: list[LoadedModel]) -> np.ndarray:
    """Each checkpoint's weight in the ensemble: per recipe (its folds averaged), then the
    recipes by their out-of-fold weights when the ensemble has them, else equally
    (`oof.model_weights`)."""
    from rsna_utils.infer.oof import model_weights
    keys = [getattr(m, "recipe", "") for m in models]
    given = {k: m.recipe_weight for k, m in zip(keys, models)
             if getattr(m, "recipe_weight", None) is not None}
    return model_weights(keys, given or None)


def set_recipe_weights(models: list[LoadedModel], recipe_weights: dict | None) -> None:
    """Give each checkpoint its recipe's weight from ensemble.json ("recipe_weights", keyed as
    this version keys recipes: `ensemble.recipe_weights`)."""
    recipe_weights = recipe_weights and ensemble_recipe_weights(recipe_weights)
    missing = [m.path for m in models if recipe_weights and m.recipe not in recipe_weights]
    if missing:
        raise RsnaError(f"{missing[0]}: its training recipe has no weight in the ensemble "
                        f"({len(missing)} of {len(models)} checkpoint(s)); the weights were "
                        "tuned for the runs `rsna oof` merged: predict with those runs' "
                        "checkpoints (or the exported folder), or rerun `rsna oof --weighting "
                        "equal` for an ensemble without weights")
    for m in models:
        m.recipe_weight = None if not recipe_weights else recipe_weights[m.recipe]


def weighted_mean(models: list[LoadedModel], attr: str) -> float:
    """A per-checkpoint value (validation threshold, prior) averaged as the predictions are
    (`ensemble_weights`)."""
    return float(np.dot(ensemble_weights(models), [getattr(m, attr) for m in models]))


class DicomStream:
    """Dataset: one preprocessed test image per row, made in memory. Never raises: a failed
    image yields zeros and its reason, so one bad file cannot stop the run."""

    def __init__(self, df: pd.DataFrame, images: Path, pre: dict, backend: str = "auto",
                 channels: int = 3, decoders=None):
        """`decoders`: the run's `DecoderSet` (default: the one of each process); it travels
        to the DataLoader's workers with the dataset."""
        from rsna_utils.image.convert import PreprocessConfig
        self.paths = [str(dicom_path(images, p, i)) for p, i in zip(df.patient_id, df.image_id)]
        self.cfg = PreprocessConfig(**{k: (tuple(v) if k == "size" else v) for k, v in pre.items()})
        self.backend, self.channels, self.decoders = backend, channels, decoders

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(output image uint8/uint16 at the preprocessing size, index, reason, looks
        inverted): a reason when the image could not be made (zeros instead); the flag of
        `roi.looks_inverted` (inverted already when the config says fix)."""
        from rsna_utils.image.convert import preprocess_image
        reason, img, meta = "", None, {}
        try:
            if not os.path.exists(self.paths[i]):
                raise RsnaError(f"{self.paths[i]}: file not found (listed in the CSV)")
            img, meta = preprocess_image(self.paths[i], self.cfg, self.backend,
                                         decoders=self.decoders)
        except RsnaError as e:
            reason = str(e)
        except Exception as e:  # a decoder bug on a strange file costs this image only
            reason = f"{self.paths[i]}: unhandled exception {type(e).__name__}: {e}"
        if img is None:
            img = np.zeros(self.cfg.size, np.uint8)
        return img, i, reason, bool(meta.get("looks_inverted"))


def _gpu_batches(ds: DicomStream, backend: str, batch_size: int, device, workers: int | None = None):
    """Like the DataLoader over `ds`, but through the GPU pipeline of `rsna_utils.image.gpu`: frames
    are read by worker processes one batch ahead while the GPU decodes the current one."""
    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.image import gpu
    decoder = gpu_batch.make_decoder(backend, "cuda", batch_size)
    h, w = ds.cfg.size
    batches = [list(range(b, min(len(ds), b + batch_size))) for b in range(0, len(ds), batch_size)]
    stream = gpu.gpu_batches([[ds.paths[i] for i in idx] for idx in batches], ds.cfg, decoder,
                             backend, device,
                             gpu.default_load_workers("cuda") if workers is None else workers,
                             decoders=ds.decoders)
    try:
        for idx, (results, _) in zip(batches, stream):
            imgs = [img if not err else np.zeros((h, w), np.uint8) for img, _, err in results]
            yield (imgs, idx, [err or "" for _, _, err in results],
                   [bool((meta or {}).get("looks_inverted")) for _, meta, _ in results])
    finally:
        stream.close()


def _collate(batch):
    return tuple([b[k] for b in batch] for k in range(4))


def input_size(m: "LoadedModel", fallback_size) -> tuple[int, int]:
    return tuple(m.size) if min(m.size) > 0 else tuple(fallback_size)


def batch_input(imgs: list, m: "LoadedModel", channels: int, fallback_size):
    """The model's input batch (N, C, H, W) from output images: the same resize and
    normalisation as training (`data.device_input` on `raw_batch`)."""
    from rsna_utils.learn.data import device_input
    return device_input(raw_batch(imgs, input_size(m, fallback_size)), None, m.norm, channels)


def input_groups(models: list, weights, fallback_size) -> dict:
    """{size: {norm: [(model, weight)]}}: the checkpoints that read the same input. A batch is
    resized and uploaded once per size and normalised once per (size, norm): every fold of a
    recipe, and every model of the same input, reads the same tensor."""
    groups: dict = {}
    for m, w in zip(models, weights):
        key = tuple(map(tuple, m.norm))
        groups.setdefault(input_size(m, fallback_size), {}).setdefault(key, []).append((m, w))
    return groups


def predict_images(df: pd.DataFrame, images: str | Path, models: list[LoadedModel], pre: dict,
                   device, batch_size: int = 16, workers: int = 2, tta: bool = False,
                   backend: str = "auto", channels: int = 3, progress: bool = True,
                   decoders=None):
    """Per-image probabilities, reasons and `roi.looks_inverted` flags: NaN and a reason where
    unreadable. `decoders`: a `DecoderSet` (default: found once here, for `device`); the GPU
    decoder and the CPU ones come from it. The checkpoints of one recipe (its folds) are averaged, then the recipes by
    the ensemble's weights or equally (`ensemble_weights`: the ensemble whose out-of-fold
    threshold `rsna oof` tunes), each with its flip when `tta`."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.dicom.decoders.registry import DecoderSet
    from rsna_utils.learn.checkpoint import cancer_probability
    from rsna_utils.learn.data import device_input
    from rsna_utils.learn.device import half_dtype
    weights = ensemble_weights(models)
    if backend in gpu_batch.GPU_BACKENDS and device.type != "cuda":
        raise RsnaError(f"backend {backend!r} decodes on a GPU but the device is {device.type}; "
                        "use --device cuda or --backend auto")
    decoders = decoders or DecoderSet.find(backend, "cuda" if device.type == "cuda" else "cpu")
    ds = DicomStream(df, Path(images), pre, backend, channels, decoders)
    chosen = gpu_batch.resolve_backend(backend, decoders=decoders) if device.type == "cuda" else "cpu"
    if chosen in gpu_batch.GPU_BACKENDS:
        # decode on the GPU in batches (CPU fallback per file inside), no worker processes
        dl = _gpu_batches(ds, chosen, batch_size, device)
    else:
        from functools import partial

        from rsna_utils.core.warn import worker_warnings
        dl = DataLoader(ds, batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        multiprocessing_context="forkserver" if workers > 0 else None,
                        pin_memory=False, worker_init_fn=partial(worker_warnings, "predict",
                                                                 not progress))
    dtype = half_dtype(device)    # bf16 from Ampere on; fp16 on a T4 / P100 (Kaggle)
    preds = np.full(len(ds), np.nan, np.float32)
    reasons, inverted = [""] * len(ds), [False] * len(ds)
    bar = tqdm(total=len(ds), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    groups = input_groups(models, weights, ds.cfg.size)
    # breast-level members: each breast pooled as soon as its views are read (`BreastStream`)
    from rsna_utils.learn.breast import BreastStream
    streams = {id(m): BreastStream(m.model, df["prediction_id"].to_numpy(), device)
               for m in models if m.level == "breast"}
    with torch.inference_mode():
        for imgs, idx, why, flag in dl:
            p = torch.zeros(len(imgs), device=device)
            for size, by_norm in groups.items():      # decoded once; uploaded once per size
                raw = raw_batch(imgs, size).to(device, non_blocking=True)
                for norm, members in by_norm.items():
                    xm = device_input(raw, None, norm, channels, channels_last=True)
                    for m, w in members:                  # every fold (and flip) on one tensor
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            if m.level == "breast":
                                streams[id(m)].add(idx, view_features(m.model, xm, tta),
                                                   [not r for r in why])
                            else:
                                p += w * cancer_probability(m.model, xm, tta).float()
            p = p.cpu().numpy()
            for j, i in enumerate(idx):
                inverted[i] = flag[j]
                if why[j]:
                    reasons[i] = why[j]
                else:
                    preds[i] = p[j]
            bar.update(len(idx))
    bar.close()
    attention = np.full(len(ds), np.nan, np.float32)
    if streams:
        preds, attention = combine_breast_members(
            preds, reasons, models, weights, {k: s.finish() for k, s in streams.items()})
    return preds, reasons, inverted, attention


def view_features(model, x, tta: bool = False):
    """(N, 1 or 2, F) float16 on the CPU: a breast model's features of each view (and of its
    mirror with `tta`), kept until the breast's other views are read (`BreastStream`)."""
    import torch
    from rsna_utils.learn.checkpoint import mirrored
    f = [model.features(x)] + ([model.features(mirrored(x))] if tta else [])
    f = torch.stack(f, dim=1).detach().float().clamp(-6e4, 6e4)       # float16's range
    return f.to(torch.float16).cpu().numpy()


def add_breast_members(preds: np.ndarray, reasons: list, df: pd.DataFrame, models, weights,
                       feats: dict, device) -> tuple[np.ndarray, np.ndarray]:
    """The breast-level members' votes added to the image members' (`preds`, which holds their
    weighted sum, 0 without any): each breast's readable views pooled by each breast model
    (the flip's features pooled apart and the probabilities averaged, as the image models'
    TTA), the breast's probability given to every view read. Returns (predictions, the
    views' attention weights averaged over the breast members by their votes)."""
    from rsna_utils.learn.breast import breast_scores
    readable = np.array([not r for r in reasons], bool)
    scored = {}
    for m in models:
        if m.level != "breast":
            continue
        f = np.concatenate(feats[id(m)]).astype(np.float32)          # (N, 1 or 2, F)
        probs, atts = zip(*(breast_scores(m.model, f[:, k], readable, df["prediction_id"], device)
                            for k in range(f.shape[1])))
        scored[id(m)] = (np.stack(probs), np.stack(atts))
    return combine_breast_members(preds, reasons, models, weights, scored)


def combine_breast_members(preds: np.ndarray, reasons: list, models, weights,
                           scored: dict) -> tuple[np.ndarray, np.ndarray]:
    """`add_breast_members` from each breast member's pooled (K, N) probabilities and
    attention weights (`scored`, by id of the member; K = 2 with the flip)."""
    readable = np.array([not r for r in reasons], bool)
    att_sum = np.zeros(len(preds), np.float32)
    vote = 0.0
    for m, w in zip(models, weights):
        if m.level != "breast":
            continue
        probs, atts = scored[id(m)]
        preds = preds + w * np.nan_to_num(np.mean(probs, axis=0))
        att_sum += w * np.nan_to_num(np.mean(atts, axis=0))
        vote += w
    preds = np.where(readable, preds, np.nan).astype(np.float32)
    return preds, np.where(readable, att_sum / max(vote, 1e-12), np.nan).astype(np.float32)


def aggregate(images: pd.DataFrame, agg: str = "mean", prior: float = DEFAULT_PRIOR) -> pd.DataFrame:
    """Per prediction_id: mean (or max) over the views that could be read; the prior where none."""
    from rsna_utils.learn.metrics import breast_level
    try:
        out = breast_level(images, "prediction", None, agg)
    except ValueError as e:
        raise RsnaError(str(e)) from None
    out["prediction"] = out["prediction"].fillna(prior)
    return out

