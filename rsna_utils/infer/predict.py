"""Inference: test DICOMs -> predictions -> a validated Kaggle submission.csv.

One step over the loaded ensemble (`scoring.LoadedEnsemble`, built once by `load_ensemble`):
its `score_images` preprocesses the images in memory with the settings stored in the
checkpoints (no PNGs written, nothing retyped) and streams batches through the members, so
memory stays flat as the test set grows; `submission` pools each breast's views and makes the
column (`cut`). An image that cannot be read still gets its breast a prediction: the mean of
the breast's other views, or the training prior when none could be read. `PredictConfig` is
the one place an inference setting is spelled (`rsna predict` flags and notebook 04 derive
from it); what the model needs of its input comes from the checkpoint.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import (Config, agg_setting, backend_setting, device_setting,
                                     progress_setting, setting, tta_setting)
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import dicom_path
# the cut and the loaded ensemble have their own homes; their names are kept here for callers
from rsna_utils.infer.cut import (FALLBACK_FACTOR, FALLBACK_MIN_EXPECTED, OUTPUTS,  # noqa: F401
                                  binarize, binary_cut, breast_output, quantile_share,
                                  resolve_output, validate_submission)
from rsna_utils.infer.engine import RUNTIMES
from rsna_utils.infer.scoring import (DicomStream, LoadedEnsemble, add_breast_members,  # noqa: F401
                                      aggregate, batch_input, combine_breast_members,
                                      ensemble_weights, input_groups, load_models,
                                      predict_images, raw_batch, set_recipe_weights,
                                      view_features, weighted_mean)
from rsna_utils.learn.checkpoint import DEFAULT_PRIOR, LoadedModel  # noqa: F401


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
    tta: bool = tta_setting()
    agg: str = agg_setting("views -> breast (rsna predict --ensemble: the JSON's)")
    binarize_how: str | None = setting(None, "binary output: threshold (the checkpoints' or "
                                       "--threshold), quantile:0.02, or quantile (with "
                                       "--ensemble: its out-of-fold positive rate)", flags=("--binarize",))
    batch_size: int = setting(16, "images per model call", ge=1)
    workers: int = setting(2, "preprocessing processes", ge=0)
    device: str = device_setting()
    shards: int | str = setting(1, "processes the test patients are split over, each on its own "
                                "device (a patient never split; the submission as one process "
                                "makes it): auto (one per CUDA GPU found, e.g. both of a Kaggle "
                                "T4 x2; 1 on the CPU) or N (N GPUs, or N processes on the CPU); "
                                "workers are shared out among them", parse=str)
    backend: str = backend_setting()
    progress: bool = progress_setting()
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
                           "it cannot run stays in PyTorch, named; tensorrt: onnx with "
                           "onnxruntime's TensorRT provider first (FP16 engines, GPU only; "
                           "else the CUDA provider, named)", choices=RUNTIMES)
    engines: str | None = setting(None, "with runtime onnx or tensorrt: the folder of `rsna "
                                  "export --out DIR` (default: --ensemble's folder, else each "
                                  "checkpoint's)")

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


def inverted_note(path: str) -> str:
    """The warning for an image that looks like a negative after windowing and was kept so."""
    return (f"{path}: scored, but it looks inverted (white at the edges after windowing, where "
            "a mammogram's background is black): its PhotometricInterpretation may not match "
            "its pixels; look at it, and preprocess with --inverted fix to invert such images")


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
    from rsna_utils.learn.png_table import load_table
    check_dicom_folder(cfg.images)
    from rsna_utils.learn.device import resolve_device
    output, binarize_how = resolve_output(cfg.output, cfg.binarize_how, cfg.calibrator, cfg.agg)
    t0 = time.perf_counter()
    from rsna_utils.infer.shard import resolve_shards, score_sharded
    shards, shard_device = resolve_shards(cfg.shards, cfg.device)
    dev = resolve_device(cfg.device if shards == 1 else "cpu")    # sharded: the models stay here
    df = load_table(cfg.csv)    # checks the columns, adds prediction_id when absent
    ens = load_ensemble(cfg, dev)
    imgs = (score_sharded(cfg, df, shards, shard_device) if shards > 1    # a process a device
            else score_images(cfg, df, ens))
    warnings = image_warnings(cfg, imgs, ens.pre)
    check_readable(cfg, imgs, warnings)
    sub, cut = submission(cfg, df, imgs, ens, output, binarize_how)
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


def load_ensemble(cfg: PredictConfig, device) -> LoadedEnsemble:
    """The config's checkpoints loaded on `device` as one `LoadedEnsemble`, with its
    inference settings (recipe weights, runtime, flip, aggregation, cut, calibrator)."""
    _, binarize_how = resolve_output(cfg.output, cfg.binarize_how, cfg.calibrator, cfg.agg)
    return LoadedEnsemble.from_checkpoints(
        cfg.checkpoints, device, cfg.member_weights, cfg.runtime, cfg.engines, tta=cfg.tta,
        agg=cfg.agg, threshold_given=cfg.threshold, binarize_how=binarize_how,
        oof_rate=cfg.oof_rate, cut_fallback=cfg.cut_fallback, calibrator=cfg.calibrator)


def score_images(cfg: PredictConfig, df: pd.DataFrame, ens: LoadedEnsemble) -> pd.DataFrame:
    """One row per image of `df`: its ensemble probability (NaN where it could not be read),
    the problem (why not), and whether it looked inverted. A CSV none of whose files is under
    the images folder is one line (`check_listed_files`), not every image unreadable."""
    from rsna_utils.dicom.reader import check_listed_files
    check_listed_files(cfg.images, [str(dicom_path(cfg.images, p, i))
                                    for p, i in zip(df.patient_id, df.image_id)], cfg.csv)
    preds, reasons, inverted, attention = ens.score_images(
        df, cfg.images, cfg.batch_size, cfg.workers, cfg.backend, cfg.progress)
    imgs = df[["patient_id", "image_id", "laterality", "prediction_id"]].copy()
    imgs["prediction"] = preds
    imgs["problem"] = reasons
    imgs["looks_inverted"] = inverted       # with --inverted fix: inverted before scoring
    if ens.has_breast_members:
        imgs["attention"] = attention       # each view's weight in its breast's pooling
    return imgs


def submission(cfg: PredictConfig, df: pd.DataFrame, imgs: pd.DataFrame, ens: LoadedEnsemble,
               output: str, binarize_how: str | None) -> tuple[pd.DataFrame, dict]:
    """prediction_id, cancer: one row per breast in test.csv order, aggregated over its views
    (a breast none of whose views was read: the training prior), cut or calibrated as asked,
    checked against sample_submission's ids; and for binary output what the cut flagged
    (`binary_cut`, with the fallback of cfg.cut_fallback / cfg.oof_rate), else {}."""
    breast = ens.score_breasts(imgs, cfg.agg)
    order = list(dict.fromkeys(df["prediction_id"]))          # test.csv order, each once
    breast = breast.set_index("prediction_id").loc[order].reset_index()
    column, cut = ens.cut(breast["prediction"].to_numpy(), output, binarize_how,
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
