"""Inference: test DICOMs -> predictions -> a validated Kaggle submission.csv.

Images are preprocessed in memory, in DataLoader worker processes, with the settings stored in
the checkpoint (no PNGs written, nothing retyped); batches stream through the model(s), so
memory stays flat as the test set grows. An image that cannot be read still gets its breast a
prediction: the mean of the breast's other views, or the training prior when none could be read.
`PredictConfig` is the one place an inference setting is spelled (`rsna predict` flags and
notebook 04 derive from it); what the model needs of its input comes from the checkpoint.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, setting
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import dicom_path
from rsna_utils.infer.ensemble import exported_recipe
from rsna_utils.learn.checkpoint import DEFAULT_PRIOR, LoadedModel, load_checkpoints

OUTPUTS = ("probability", "calibrated", "binary")

# The cut fallback (`binary_cut`). ensemble.json carries one out-of-fold positive rate (its
# "quantile": the share of breasts the tuned threshold flagged out of fold), not the spread of
# that share over the folds, so the range a test set may flag at the threshold is a stated factor
# around it. A factor of 3 either way leaves alone what ordinary variation does to the share
# (the test set's cancer rate, and a threshold tuned on a few hundred positive breasts, move it
# by tens of percent) and catches a shift of the scores' scale (another decoder, scanner mix or
# flip) that makes the threshold flag next to nothing or several times too many breasts.
FALLBACK_FACTOR = 3.0
# The share is judged only where the rate expects at least this many flagged breasts: with 10
# expected, a count below the range (3 or fewer) has a chance of about 1% when nothing shifted;
# on a few dozen breasts (Kaggle's visible test) 0 or 1 flagged says nothing about the cut.
FALLBACK_MIN_EXPECTED = 10.0


@dataclass
class PredictConfig(Config):
    """Every setting of an inference run: `rsna predict` flags and notebook 04 parameters are
    these names (the field order is the old positional order of `predict`). What the models
    need of their input comes from the checkpoints, not from here. Checked on creation."""

    KIND = "prediction"

    images: str = setting(help="test_images folder: {patient_id}/{image_id}.dcm")
    csv: str = setting(help="test.csv")
    checkpoints: list = setting(help="one or more best.pt of `rsna train`")
    out: str | None = setting("submission.csv", "the submission (beside it: _warnings.csv and "
                              "_images.csv); None: write nothing")
    sample_submission: str | None = setting(None, "check the prediction_ids against it")
    labels: str | None = setting(None, "CSV with image_id,cancer: also score image/breast pF1, "
                                 "AUC, threshold")
    tta: bool = setting(False, "average with the horizontal flip")
    agg: str = setting("mean", "views -> breast (rsna predict --ensemble: the JSON's)",
                       choices=("mean", "max"))
    binarize_how: str | None = setting(None, "binary output: threshold (the checkpoints' or "
                                       "--threshold), quantile:0.02, or quantile (with "
                                       "--ensemble: its out-of-fold positive rate)", flags=("--binarize",))
    batch_size: int = setting(16, "images per model call", ge=1)
    workers: int = setting(2, "preprocessing processes", ge=0)
    device: str = setting("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    shards: int | str = setting(1, "processes the test patients are split over, each on its own "
                                "device (a patient never split; the submission as one process "
                                "makes it): auto (one per CUDA GPU found, e.g. both of a Kaggle "
                                "T4 x2; 1 on the CPU) or N (N GPUs, or N processes on the CPU); "
                                "workers are shared out among them", parse=str)
    backend: str = setting("auto", "decoder: auto, imagecodecs, dicomsdl, pydicom, nvimgcodec, "
                           "dali")
    progress: bool = setting(True, "progress bar", negate="--quiet")
    max_unreadable: float = setting(0.05, "stop without a submission when more than this share "
                                    "of the images cannot be read (their breasts would go in at "
                                    "the training prior); 1: never stop", ge=0, le=1)
    threshold: float | None = setting(None, "the cut of binary output; None: the "
                                      "checkpoints' validation thresholds, averaged per recipe", ge=0, le=1)
    output: str | None = setting(None, "submission values: probability, calibrated or binary; "
                                 "None: binary with binarize_how, else probability",
                                 choices=OUTPUTS)
    calibrator: dict | None = setting(None, "ensemble.json's calibrator (output calibrated)",
                                      cli=False)
    member_weights: dict | None = setting(None, "ensemble.json's recipe_weights: each model's "
                                          "vote from its out-of-fold score (None: equal)",
                                          cli=False)
    cut_fallback: bool = setting(True, "binary output at the ensemble's threshold: when the "
                                 "share of breasts it flags falls outside the out-of-fold range "
                                 f"(its positive rate /{FALLBACK_FACTOR:g} to "
                                 f"x{FALLBACK_FACTOR:g}), "
                                 "flag that rate instead (the quantile cut); acts only with "
                                 "oof_rate (an ensemble's)", negate="--no-cut-fallback")
    oof_rate: float | None = setting(None, "ensemble.json's quantile: the share of breasts its "
                                     "tuned threshold flagged out of fold, the rate and range of "
                                     "the cut fallback (None: the threshold alone, as before)",
                                     gt=0, lt=1, cli=False)
    runtime: str = setting("torch", "torch: eager PyTorch; onnx: each member's export (`rsna "
                           "export --format onnx`) through onnxruntime, probed first; a member "
                           "it cannot run stays in PyTorch, named", choices=("torch", "onnx"))
    engines: str | None = setting(None, "with runtime onnx: the folder of `rsna export --out "
                                  "DIR` (default: --ensemble's folder, else each checkpoint's)")

    def __post_init__(self):
        if isinstance(self.checkpoints, (str, os.PathLike)):
            self.checkpoints = [self.checkpoints]
        self.check_fields()
        self.checkpoints = [os.fspath(c) for c in self.checkpoints]
        if self.binarize_how == "quantile":
            raise RsnaError("binarize quantile: the out-of-fold positive rate comes from an "
                            "ensemble; pass --ensemble ensemble.json, or give quantile:Q (e.g. "
                            "quantile:0.02)")
        if self.binarize_how not in (None, "threshold"):
            quantile_share(self.binarize_how)
        from rsna_utils.infer.shard import parse_shards
        self.shards = parse_shards(self.shards)
        resolve_output(self.output, self.binarize_how, self.calibrator, self.agg)


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
    """Give each checkpoint its recipe's weight from ensemble.json ("recipe_weights")."""
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
                 channels: int = 3):
        from rsna_utils.image.convert import PreprocessConfig
        self.paths = [str(dicom_path(images, p, i)) for p, i in zip(df.patient_id, df.image_id)]
        self.cfg = PreprocessConfig(**{k: (tuple(v) if k == "size" else v) for k, v in pre.items()})
        self.backend, self.channels = backend, channels

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
            img, meta = preprocess_image(self.paths[i], self.cfg, self.backend)
        except RsnaError as e:
            reason = str(e)
        except Exception as e:  # a decoder bug on a strange file costs this image only
            reason = f"{self.paths[i]}: unhandled exception {type(e).__name__}: {e}"
        if img is None:
            img = np.zeros(self.cfg.size, np.uint8)
        return img, i, reason, bool(meta.get("looks_inverted"))


def inverted_note(path: str) -> str:
    """The warning for an image that looks like a negative after windowing and was kept so."""
    return (f"{path}: scored, but it looks inverted (white at the edges after windowing, where "
            "a mammogram's background is black): its PhotometricInterpretation may not match "
            "its pixels; look at it, and preprocess with --inverted fix to invert such images")


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
                             gpu.default_load_workers("cuda") if workers is None else workers)
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


def raw_batch(imgs: list, size):
    """The output images resized to `size` (`roi.resize`, aspect kept, black padding: training's
    resize) as one (N, 1, H, W) uint8 / uint16 tensor: what goes to the device, once per size."""
    import torch

    from rsna_utils.image import roi
    arrays = [roi.resize(im, size, "pad") for im in imgs]
    if len({a.dtype for a in arrays}) > 1:                    # 8- and 16-bit PNGs mixed
        arrays = [a.astype(np.uint16) * (257 if a.dtype == np.uint8 else 1) for a in arrays]
    return torch.from_numpy(np.stack(arrays))[:, None]


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


@dataclass
class PredictResult:
    submission: pd.DataFrame
    images: pd.DataFrame                 # one row per image: prediction (NaN when unreadable)
    warnings: list = field(default_factory=list)    # unreadable images, and inverted-looking ones
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    cut: dict = field(default_factory=dict)         # binary output: what was flagged (binary_cut)

    def counts(self) -> str:
        """"N unreadable" and, when any, "M look inverted" (both listed in the warnings)."""
        bad = int(self.images["problem"].astype(bool).sum()) if "problem" in self.images else 0
        inv = int(self.images["looks_inverted"].sum()) if "looks_inverted" in self.images else 0
        return f"{bad} unreadable" + (f", {inv} look inverted" if inv else "")


def predict_images(df: pd.DataFrame, images: str | Path, models: list[LoadedModel], pre: dict,
                   device, batch_size: int = 16, workers: int = 2, tta: bool = False,
                   backend: str = "auto", channels: int = 3, progress: bool = True):
    """Per-image probabilities, reasons and `roi.looks_inverted` flags: NaN and a reason where
    unreadable. The checkpoints of one recipe (its folds) are averaged, then the recipes by
    the ensemble's weights or equally (`ensemble_weights`: the ensemble whose out-of-fold
    threshold `rsna oof` tunes), each with its flip when `tta`."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.learn.checkpoint import cancer_probability
    from rsna_utils.learn.data import device_input
    from rsna_utils.learn.device import half_dtype
    weights = ensemble_weights(models)
    ds = DicomStream(df, Path(images), pre, backend, channels)
    if backend in gpu_batch.GPU_BACKENDS and device.type != "cuda":
        raise RsnaError(f"backend {backend!r} decodes on a GPU but the device is {device.type}; "
                        "use --device cuda or --backend auto")
    chosen = gpu_batch.resolve_backend(backend) if device.type == "cuda" else "cpu"
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


def binarize(values: np.ndarray, how: str | None, threshold: float) -> np.ndarray:
    """None: probabilities; "threshold": >= the checkpoint's tuned threshold; "quantile:q":
    the top q share (e.g. quantile:0.02) set to 1."""
    if not how:
        return values
    if how == "threshold":
        return (values >= threshold).astype(np.float64)
    cut = np.quantile(values, 1 - quantile_share(how))
    return (values >= cut).astype(np.float64)


def binary_cut(values: np.ndarray, how: str | None, threshold: float,
               oof_rate: float | None = None, fallback: bool = True) -> tuple[np.ndarray, dict]:
    """`binarize`, and what it flagged: (0/1 per breast, record). The record (PredictResult.cut)
    holds binarize, threshold, breasts, flagged and share (at the cut asked for), oof_rate,
    range, judged (whether the share was held against the range), fell_back, and the submitted
    flagged / submitted_share, with "line": one sentence saying all that.

    With "threshold" and `oof_rate` (an ensemble's out-of-fold positive rate): the share flagged
    is held against the range [rate / FALLBACK_FACTOR, rate x FALLBACK_FACTOR], when the test set
    is large enough to tell (n x rate >= FALLBACK_MIN_EXPECTED); outside it, and with
    `fallback`, the top `oof_rate` of the breasts is flagged instead (`binarize` "quantile:rate",
    the cut the ensemble's quantile mode would make)."""
    how = how or "threshold"
    values = np.asarray(values, dtype=np.float64)
    out = binarize(values, how, threshold)
    n, flagged = len(values), int(out.sum())
    share = flagged / n if n else 0.0
    at = (f"threshold {threshold:.4f}" if how == "threshold"
          else f"the top {quantile_share(how):.2%} ({how})")
    rec = {"binarize": how, "threshold": float(threshold) if how == "threshold" else None,
           "breasts": n, "flagged": flagged, "share": share, "oof_rate": oof_rate,
           "range": None, "judged": False, "fell_back": False,
           "submitted_flagged": flagged, "submitted_share": share}
    head = f"binary output: {flagged:,} of {n:,} breasts ({share:.2%}) flagged at {at}"
    if how != "threshold" or oof_rate is None:
        return out, {**rec, "line": head}
    rate = float(oof_rate)
    lo, hi = rate / FALLBACK_FACTOR, min(rate * FALLBACK_FACTOR, 1.0)
    rec["range"] = [lo, hi]
    span = (f"the out-of-fold range {lo:.2%}-{hi:.2%} (the ensemble's out-of-fold positive rate "
            f"{rate:.2%}, /{FALLBACK_FACTOR:g} to x{FALLBACK_FACTOR:g})")
    expected = n * rate
    if expected < FALLBACK_MIN_EXPECTED:
        return out, {**rec, "line": f"{head}; too few breasts to hold that share against {span}: "
                                    f"{expected:.1f} expected flagged, under "
                                    f"{FALLBACK_MIN_EXPECTED:g}; kept the threshold"}
    rec["judged"] = True
    if lo <= share <= hi:
        return out, {**rec, "line": f"{head}, inside {span}: kept the threshold"}
    if not fallback:
        return out, {**rec, "line": f"{head}, OUTSIDE {span}; cut_fallback is off: kept the "
                                    "threshold"}
    out = binarize(values, f"quantile:{rate!r}", threshold)
    now = int(out.sum())
    rec.update(fell_back=True, submitted_flagged=now, submitted_share=now / n)
    rec["line"] = (f"cut fallback: threshold {threshold:.4f} flagged {flagged:,} of {n:,} breasts "
                   f"({share:.2%}), outside {span}; flagged the top {rate:.2%} instead (the "
                   f"quantile cut: {now:,} breasts, {now / n:.2%})")
    return out, rec


def quantile_share(how: str) -> float:
    """"quantile:0.02" -> 0.02; RsnaError for anything else."""
    kind, _, q = str(how).partition(":")
    try:
        share = float(q) if kind == "quantile" else None
    except ValueError:
        share = None
    if share is None:
        raise RsnaError(f"binarize_how={how!r}: choose threshold or quantile:Q (e.g. quantile:0.02)")
    if not 0 < share < 1:
        raise RsnaError(f"binarize_how={how!r}: the share must be in (0, 1), e.g. quantile:0.02")
    return share



def resolve_output(output: str | None, binarize_how: str | None,
                   calibrator: dict | None = None, agg: str = "mean") -> tuple[str, str | None]:
    """What the submission holds: "probability" (the ensemble's breast probability),
    "calibrated" (that probability through `calibrator`, `calibrate.apply_calibrator`) or
    "binary" (0/1 at `binarize_how`: "threshold" (default) or "quantile:q").
    Default: binary when `binarize_how` is given (the old --binarize), else probability.
    Returns (output, binarize_how); RsnaError for a combination that cannot be meant."""
    if output is None:
        output = "binary" if binarize_how else "probability"
    if output not in OUTPUTS:
        raise RsnaError(f"output {output!r}: choose one of {', '.join(OUTPUTS)}")
    if output != "binary" and binarize_how:
        raise RsnaError(f"--binarize {binarize_how} with --output {output}: binarising gives "
                        "--output binary; drop one of them")
    if output == "binary":
        return output, binarize_how or "threshold"
    if output == "calibrated":
        from rsna_utils.infer.calibrate import check_calibrator
        if calibrator is None:
            raise RsnaError("--output calibrated needs a calibrator: pass --ensemble "
                            "ensemble.json written by `rsna oof` (it fits one on the out-of-fold "
                            "predictions), or calibrator= to predict()")
        check_calibrator(calibrator)
        if calibrator.get("agg", agg) != agg:
            raise RsnaError(f"the calibrator was fitted on {calibrator['agg']}-aggregated breasts "
                            f"but the views are aggregated with {agg}; use --agg "
                            f"{calibrator['agg']} or refit with `rsna oof --agg {agg}`")
    return output, None


def validate_submission(sub: pd.DataFrame, expected_ids: list[str]) -> None:
    """The checks Kaggle would fail a file for; raises RsnaError saying which one."""
    if list(sub.columns) != ["prediction_id", "cancer"]:
        raise RsnaError(f"submission columns {list(sub.columns)}: must be prediction_id,cancer")
    if sub["prediction_id"].duplicated().any():
        raise RsnaError(f"duplicated prediction_id {sub.prediction_id[sub.prediction_id.duplicated()].iloc[0]!r}")
    missing = set(expected_ids) - set(sub["prediction_id"])
    extra = set(sub["prediction_id"]) - set(expected_ids)
    if missing or extra:
        raise RsnaError(f"submission ids differ from the expected ones: {len(missing)} missing "
                        f"(e.g. {sorted(missing)[:2]}), {len(extra)} extra (e.g. {sorted(extra)[:2]})")
    v = pd.to_numeric(sub["cancer"], errors="coerce")
    if v.isna().any():
        raise RsnaError(f"cancer is NaN or not a number for {int(v.isna().sum())} row(s), e.g. "
                        f"{sub.prediction_id[v.isna()].iloc[0]!r}")
    if ((v < 0) | (v > 1)).any():
        raise RsnaError(f"cancer outside [0, 1] for {int(((v < 0) | (v > 1)).sum())} row(s)")


def predict(images: str | Path | PredictConfig, *args, **settings) -> PredictResult:
    """The whole inference step (what `rsna predict` and the inference notebook call):
    `predict(PredictConfig(...))`, or the config's fields as arguments, positional in the
    field order (`predict(images, csv, checkpoints, out, labels=...)`).

    `threshold`: the cut for binarize_how="threshold" (e.g. the out-of-fold ensemble threshold
    of `oof.write_ensemble`); default: the checkpoints' validation thresholds averaged as the scores are.
    `output`: probability, calibrated or binary (`resolve_output`); calibrated needs
    `calibrator` (ensemble.json's "calibrator"). Binary output cuts the raw probability (the
    threshold was tuned on it). Breasts with no readable view get the training prior, not
    calibrated (it already is the cancer rate). Binary output prints the share of breasts it
    flags (`binary_cut`, kept in PredictResult.cut); at the ensemble's threshold with its
    out-of-fold rate (`oof_rate`), a share outside the out-of-fold range flags that rate instead
    unless `cut_fallback` is off. Beside `out`: <stem>_warnings.csv and
    <stem>_images.csv (per image: the raw probability, the label when `labels` is given)."""
    cfg = _as_config(images, args, settings)
    from rsna_utils.dicom.reader import check_dicom_folder
    from rsna_utils.learn.data import load_table
    check_dicom_folder(cfg.images)
    from rsna_utils.learn.device import resolve_device
    output, binarize_how = resolve_output(cfg.output, cfg.binarize_how, cfg.calibrator, cfg.agg)
    t0 = time.perf_counter()
    from rsna_utils.infer.shard import resolve_shards, score_sharded
    shards, shard_device = resolve_shards(cfg.shards, cfg.device)
    dev = resolve_device(cfg.device if shards == 1 else "cpu")    # sharded: the models stay here
    df = load_table(cfg.csv)    # checks the columns, adds prediction_id when absent
    models, pre = load_models(cfg.checkpoints, dev)
    if cfg.runtime == "onnx":       # exported members through onnxruntime (`infer.engine`)
        from rsna_utils.infer.engine import attach_engines
        attach_engines(models, dev, cfg.engines)
    set_recipe_weights(models, cfg.member_weights)
    imgs = (score_sharded(cfg, df, shards, shard_device) if shards > 1    # a process a device
            else score_images(cfg, df, models, pre, dev))
    warnings = image_warnings(cfg, imgs, pre)
    check_readable(cfg, imgs, warnings)
    sub, cut = submission(cfg, df, imgs, models, output, binarize_how)
    if cut:
        print(cut["line"])
    res = PredictResult(sub, imgs, warnings, seconds=time.perf_counter() - t0, cut=cut)
    if cfg.labels is not None:
        res.metrics = score(imgs, cfg.labels)
        res.images = imgs.merge(_labels(cfg.labels)[["image_id", "cancer"]], on="image_id", how="left")
    if cfg.out is not None:
        write_outputs(Path(cfg.out), res)
    return res


def _as_config(images, args: tuple, settings: dict) -> PredictConfig:
    if isinstance(images, PredictConfig):
        if args or settings:
            raise TypeError("predict(config) takes no further arguments; set them in the config")
        return images
    return PredictConfig(images, *args, **settings)


def score_images(cfg: PredictConfig, df: pd.DataFrame, models: list[LoadedModel], pre: dict,
                 device) -> pd.DataFrame:
    """One row per image of `df`: its ensemble probability (NaN where it could not be read),
    the problem (why not), and whether it looked inverted. A CSV none of whose files is under
    the images folder is one line (`check_listed_files`), not every image unreadable."""
    from rsna_utils.dicom.reader import check_listed_files
    check_listed_files(cfg.images, [str(dicom_path(cfg.images, p, i))
                                    for p, i in zip(df.patient_id, df.image_id)], cfg.csv)
    preds, reasons, inverted, attention = predict_images(
        df, cfg.images, models, pre, device, cfg.batch_size, cfg.workers, cfg.tta, cfg.backend,
        models[0].channels, cfg.progress)
    imgs = df[["patient_id", "image_id", "laterality", "prediction_id"]].copy()
    imgs["prediction"] = preds
    imgs["problem"] = reasons
    imgs["looks_inverted"] = inverted       # with --inverted fix: inverted before scoring
    if any(m.level == "breast" for m in models):
        imgs["attention"] = attention       # each view's weight in its breast's pooling
    return imgs


def submission(cfg: PredictConfig, df: pd.DataFrame, imgs: pd.DataFrame,
               models: list[LoadedModel], output: str,
               binarize_how: str | None) -> tuple[pd.DataFrame, dict]:
    """prediction_id, cancer: one row per breast in test.csv order, aggregated over its views
    (a breast none of whose views was read: the training prior), cut or calibrated as asked,
    checked against sample_submission's ids; and for binary output what the cut flagged
    (`binary_cut`, with the fallback of cfg.cut_fallback / cfg.oof_rate), else {}."""
    breast = aggregate(imgs, cfg.agg, weighted_mean(models, "prior"))
    threshold = cfg.threshold if cfg.threshold is not None else weighted_mean(models, "threshold")
    order = list(dict.fromkeys(df["prediction_id"]))          # test.csv order, each once
    breast = breast.set_index("prediction_id").loc[order].reset_index()
    values, cut = breast["prediction"].to_numpy(), {}
    if output == "binary":
        column, cut = binary_cut(values, binarize_how, threshold, cfg.oof_rate, cfg.cut_fallback)
    else:
        column = breast_output(values, output, binarize_how, threshold, cfg.calibrator,
                               unread=_unread(imgs, breast["prediction_id"]))
    sub = pd.DataFrame({"prediction_id": breast["prediction_id"], "cancer": column})
    expected = order
    if cfg.sample_submission is not None:
        expected = list(pd.read_csv(cfg.sample_submission)["prediction_id"])
    validate_submission(sub, expected)
    return sub, cut


def image_warnings(cfg: PredictConfig, imgs: pd.DataFrame, pre: dict) -> list[dict]:
    """One row per image that was not read, or was scored while looking inverted."""
    def note(r):
        if r.looks_inverted and pre.get("inverted", "warn") == "warn":
            return inverted_note(str(dicom_path(cfg.images, r.patient_id, r.image_id)))
        return ""
    return [dict(image_id=r.image_id, prediction_id=r.prediction_id, reason=r.problem or note(r))
            for r in imgs.itertuples() if r.problem or note(r)]


def check_readable(cfg: PredictConfig, imgs: pd.DataFrame, warnings: list[dict]) -> None:
    """Stop, without a submission, when more than `cfg.max_unreadable` of the images could not
    be read: their breasts would go in at the training prior, a worthless submission that
    looks complete. The list of images and reasons is written first (<stem>_warnings.csv)."""
    bad = int(imgs["problem"].astype(bool).sum())
    n = len(imgs)
    if n == 0 or bad / n <= cfg.max_unreadable:
        return
    where = "the reasons are in the warnings above"
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        wpath = out.with_name(out.stem + "_warnings.csv")
        table = pd.DataFrame(warnings, columns=["image_id", "prediction_id", "reason"])
        write_atomic(wpath, lambda tmp: table.to_csv(tmp, index=False))
        where = f"the list with each reason: {wpath}"
    first = next((w["reason"] for w in warnings if w["reason"]), "")
    raise RsnaError(f"{bad} of {n} images ({bad / n:.0%}) could not be read, more than "
                    f"max_unreadable={cfg.max_unreadable:g}; no submission written ({where}; the "
                    f"first: {first[:200]}). Fix the images folder or the decoders, or raise "
                    "--max-unreadable to submit the training prior for those breasts")


def write_outputs(out: Path, res: PredictResult) -> None:
    """The submission, and beside it <stem>_warnings.csv and <stem>_images.csv (for `rsna
    evaluate --predictions`; labels from --meta or from `labels`), each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: res.submission.to_csv(tmp, index=False))
    warnings = pd.DataFrame(res.warnings, columns=["image_id", "prediction_id", "reason"])
    write_atomic(out.with_name(out.stem + "_warnings.csv"),
                 lambda tmp: warnings.to_csv(tmp, index=False))
    write_atomic(out.with_name(out.stem + "_images.csv"),
                 lambda tmp: res.images.to_csv(tmp, index=False))


# help() and inspect show the settings predict takes: the fields of PredictConfig
predict.__signature__ = inspect.signature(PredictConfig).replace(return_annotation=PredictResult)


def _unread(imgs: pd.DataFrame, ids: pd.Series) -> np.ndarray:
    """Per breast (in `ids` order): True when none of its views could be read."""
    read = imgs["prediction"].notna().groupby(imgs["prediction_id"]).any()
    return ~read.loc[ids].to_numpy()


def breast_output(values: np.ndarray, output: str, binarize_how: str | None = None,
                  threshold: float = 0.5, calibrator: dict | None = None,
                  unread: np.ndarray | None = None) -> np.ndarray:
    """The submission's column from the breast probabilities: as they are (probability),
    through the calibrator (calibrated; breasts flagged in `unread` keep their value, the
    prior) or 0/1 (binary: `binarize` of the raw values)."""
    if output == "probability":
        return values
    if output == "binary":
        return binarize(values, binarize_how or "threshold", threshold)
    if output == "calibrated":
        from rsna_utils.infer.calibrate import apply_calibrator
        if calibrator is None:
            raise RsnaError("output calibrated: no calibrator given (ensemble.json's "
                            "\"calibrator\" from `rsna oof`)")
        cal = apply_calibrator(calibrator, values)
        return np.where(unread, values, cal) if unread is not None else cal
    raise RsnaError(f"output {output!r}: choose one of {', '.join(OUTPUTS)}")


def score(imgs: pd.DataFrame, labels: str | Path) -> dict:
    """Image- and breast-level metrics against a CSV with image_id and cancer."""
    from rsna_utils.learn.metrics import evaluate
    lab = _labels(labels)
    d = imgs.merge(lab[["image_id", "cancer"]], on="image_id", how="inner")
    if d.empty:
        raise RsnaError(f"{labels}: none of the predicted image_ids is labelled there")
    d["prediction"] = d["prediction"].fillna(DEFAULT_PRIOR)
    return evaluate(d)


def _labels(labels: str | Path) -> pd.DataFrame:
    lab = pd.read_csv(labels)
    if not {"image_id", "cancer"} <= set(lab.columns):
        raise RsnaError(f"{labels}: needs image_id and cancer columns (train.csv or test_labels.csv)")
    return lab
