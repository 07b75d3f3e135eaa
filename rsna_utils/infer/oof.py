"""Out-of-fold (OOF) predictions merged across folds and models, and one threshold tuned for
the exact ensemble that will be submitted (not an average of per-model thresholds).

Each training run (`rsna train --out RUN`) writes RUN/val_predictions.csv (the best epoch's
validation predictions: the train.csv columns, prediction_id, png, fold, prediction) and
RUN/config.json (the TrainConfig). Here:

* runs of one model (same training recipe, different folds) are concatenated: every image once
  per model; an image in two runs of one model is an error naming both folders;
* models are averaged per image, each weighted by its out-of-fold breast AUC above chance (or
  equally), as inference averages its checkpoints; then aggregated per breast exactly as the
  submission is
  (`metrics.breast_level`, mean or max over the views);
* the threshold (or the top share q to flag) is tuned once, on that averaged breast-level
  prediction.

What identifies a model: a `model` column in val_predictions.csv when present; otherwise the
run's config.json without the fields that vary per run and do not change the model (`fold`,
`out`, `resume`, `progress`, `workers`, `device`, `cache`), so two resnet18 recipes at different
sizes or seeds are two models, and the folds of one recipe are one; its label is the config's
`model` (with the differing fields added when two recipes share that name). Without a
config.json the folder names it: `runs/effb3/fold2` or `runs/effb3_fold2` -> model `effb3`,
fold 2. The fold comes from the CSV's `fold` column (what train.py writes: the validation
fold), else config.json (`fold` for kfold, 1 for the holdout split), else the folder name.

Images that some models lack: `merge_oof` raises RsnaError by default (averaging fewer models
for them would not be the ensemble inference runs); `allow_missing=True` instead keeps only the
images every model scored and reports how many were dropped in `df.attrs["dropped_images"]`
(and in the dict and JSON of `ensemble_threshold` / `write_ensemble`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, agg_setting, setting
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.infer.calibrate import METHODS as CALIBRATIONS
from rsna_utils.infer.calibrate import calibrate_oof
from rsna_utils.infer.ensemble import Ensemble
from rsna_utils.core.table import with_prediction_id
from rsna_utils.learn import metrics
from rsna_utils.learn.checkpoint import PER_RUN_FIELDS, folder_model_fold, read_run_config, recipe_key

PRED_FILE = "val_predictions.csv"
OOF_FILE = "oof_predictions.csv"
NEEDED = ("image_id", "patient_id", "laterality", "cancer", "prediction")


# ----------------------------------------------------------------------------------------
# Reading one run
# ----------------------------------------------------------------------------------------



def _config_fold(cfg: dict) -> int | None:
    if cfg.get("split") == "holdout":
        return 1                    # train.make_split validates on fold 1 of the holdout split
    f = cfg.get("fold")
    return int(f) if isinstance(f, (int, float)) and not isinstance(f, bool) else None


def model_weights(keys: list[str], recipe_weights: dict[str, float] | None = None) -> np.ndarray:
    """Weights that average checkpoints per model (recipe key), then the models by
    `recipe_weights` (ensemble.json's, from their out-of-fold scores) or equally: the ensemble
    `merge_oof` tunes its threshold on. Equal weights and the same number of checkpoints per
    model (e.g. 4 folds each) give a flat mean."""
    counts = pd.Series(keys).value_counts()
    if not recipe_weights:
        return np.array([1.0 / (len(counts) * counts[k]) for k in keys])
    missing = sorted(set(keys) - set(recipe_weights))
    if missing:
        raise RsnaError(f"{len(missing)} checkpoint recipe(s) have no weight in the ensemble "
                        f"(e.g. {missing[0][:120]}...); predict with the checkpoints of the runs "
                        "`rsna oof` weighed, or without its weights")
    total = sum(recipe_weights[k] for k in counts.index)
    if total <= 0:
        raise RsnaError("every checkpoint given belongs to a model with no vote in the ensemble "
                        "(its out-of-fold AUC was at chance); add the checkpoints of the models "
                        "that have one, or rerun `rsna oof --weighting equal`")
    return np.array([recipe_weights[k] / (total * counts[k]) for k in keys])


def _read_run(run: Path) -> tuple[pd.DataFrame, dict | None]:
    """One run's rows with columns NEEDED + prediction_id, fold, run, model_key, model_name."""
    if not run.is_dir():
        raise RsnaError(f"{run}: run folder not found; pass folders written by `rsna train --out`")
    path = run / PRED_FILE
    if not path.exists():
        raise RsnaError(f"{run}: no {PRED_FILE} in this run folder; train it for at least one "
                        "epoch (train.py writes it at each best epoch) or leave the run out")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: cannot be read as CSV ({type(e).__name__}); rerun the training "
                        "or leave the run out") from None
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise RsnaError(f"{path}: missing column(s) {missing}; {PRED_FILE} needs "
                        f"{', '.join(NEEDED)} (as `rsna train` writes it); regenerate it or add them")
    if df.empty:
        raise RsnaError(f"{path}: no rows; the run's validation split is empty, retrain it or "
                        "leave the run out")
    for c in ("image_id", "patient_id", "cancer", "prediction"):
        bad = df[c].isna() | pd.to_numeric(df[c], errors="coerce").isna()
        if bad.any():
            raise RsnaError(f"{path}: {int(bad.sum())} row(s) with an empty or non-numeric {c} "
                            f"(first: row {int(np.flatnonzero(bad.to_numpy())[0]) + 2}); a diverged "
                            "run (NaN predictions)? retrain it or leave the run out")
    df = df.copy()
    df["image_id"] = pd.to_numeric(df["image_id"]).astype("int64")
    df["patient_id"] = pd.to_numeric(df["patient_id"]).astype("int64")
    df["cancer"] = pd.to_numeric(df["cancer"]).astype("int64")
    df["prediction"] = pd.to_numeric(df["prediction"]).astype("float64")
    df["laterality"] = df["laterality"].astype(str)
    df = with_prediction_id(df)
    df["prediction_id"] = df["prediction_id"].astype(str)

    cfg = read_run_config(run)
    _, folder_fold = folder_model_fold(run)
    if "model" in df.columns and df["model"].notna().all():
        df["model_name"] = df["model"].astype(str)
        df["model_key"] = "column:" + df["model_name"]
    else:
        df["model_key"], df["model_name"] = recipe_key(cfg, run)
    if "fold" in df.columns and pd.to_numeric(df["fold"], errors="coerce").notna().all():
        df["fold"] = pd.to_numeric(df["fold"]).astype("int64")
    else:
        fold = _config_fold(cfg) if cfg is not None else None
        fold = folder_fold if fold is None else fold
        df["fold"] = pd.Series(fold if fold is not None else pd.NA, index=df.index, dtype="Int64")
    df["run"] = str(run)
    keep = list(NEEDED) + ["prediction_id", "fold", "run", "model_key", "model_name"]
    return df[keep], cfg


def _labels(keys: dict[str, tuple[str, dict | None]]) -> dict[str, str]:
    """model_key -> a readable, unique label: the model name, plus the config fields that differ
    when two recipes share a name (or a short hash when that would be long or ambiguous)."""
    by_name: dict[str, list[str]] = {}
    for k, (name, _) in keys.items():
        by_name.setdefault(name, []).append(k)
    out: dict[str, str] = {}
    for name, ks in by_name.items():
        if len(ks) == 1:
            out[ks[0]] = name
            continue
        cfgs = [keys[k][1] or {} for k in ks]
        fields = sorted({f for c in cfgs for f in c} - PER_RUN_FIELDS)
        differ = [f for f in fields if len({json.dumps(c.get(f), sort_keys=True, default=str)
                                            for c in cfgs}) > 1]
        for k, c in zip(ks, cfgs):
            desc = ",".join(f"{f}={json.dumps(c.get(f), default=str)}" for f in differ)
            label = f"{name}[{desc}]"
            if not differ or len(label) > 60:
                label = f"{name}-{hashlib.sha1(k.encode()).hexdigest()[:6]}"
            out[k] = label
    if len(set(out.values())) < len(out):          # e.g. a folder name equal to a CSV model name
        out = {k: f"{v}-{hashlib.sha1(k.encode()).hexdigest()[:6]}" for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------

WEIGHTINGS = ("auc", "equal")


def merge_oof(run_dirs: list[str | Path], allow_missing: bool = False,
              weighting: str = "auc", agg: str = "mean") -> pd.DataFrame:
    """The OOF predictions of the ensemble, one row per image.

    Folds of one model are concatenated (an image in two of its runs raises RsnaError naming
    both folders); models are averaged per image (`prediction`, what inference submits before
    the breast aggregation), weighted by `weighting`: "auc" (each model by its out-of-fold
    breast AUC above chance, `score_weights`: a model at chance gets no vote) or "equal". Images scored by only some models raise
    RsnaError, unless `allow_missing`, which keeps the images all models scored.

    Columns: patient_id, image_id, laterality, prediction_id, cancer, prediction, n_models, and
    per model `pred_<label>` and `fold_<label>`. attrs: "runs" (run, model, fold, images per
    run), "models" (labels), "dropped_images" (int), "weights" and "model_auc" (per label),
    "recipe_weights" (per recipe key: what inference weighs the checkpoints by)."""
    if weighting not in WEIGHTINGS:
        raise RsnaError(f"weighting {weighting!r}: choose {' or '.join(WEIGHTINGS)}")
    runs = _unique_runs(run_dirs)
    allr, tta = _read_runs(runs)
    _check_overlaps(allr)
    wide, model_labels, dropped = _complete_images(allr, runs, allow_missing)
    meta = (allr.drop_duplicates("image_id").set_index("image_id")
            [["patient_id", "laterality", "prediction_id", "cancer"]]).loc[wide.index]
    aucs = {m: _breast_auc(meta, wide[m], agg) for m in model_labels}
    weights = score_weights(aucs) if weighting == "auc" else {m: 1 / len(aucs) for m in aucs}
    out = _merged_table(allr, wide, model_labels, weights)
    key_of = dict(allr[["model", "model_key"]].drop_duplicates().itertuples(index=False))
    out.attrs["weighting"] = weighting
    out.attrs["weights"] = weights
    out.attrs["model_auc"] = aucs
    if weighting == "auc":        # equal: no weights stored, inference averages as before
        out.attrs["recipe_weights"] = {key_of[m]: w for m, w in weights.items()}
    out.attrs["runs"] = _run_info(allr, runs)
    out.attrs["models"] = model_labels
    out.attrs["dropped_images"] = dropped
    out.attrs["tta"] = tta
    return out


def _unique_runs(run_dirs) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise RsnaError("no run folders given; pass the folders written by `rsna train --out` "
                        "(every fold of every model of the ensemble)")
    seen: dict[Path, Path] = {}
    for r in runs:
        rr = r.resolve()
        if rr in seen:
            raise RsnaError(f"{r}: run folder given twice (also as {seen[rr]}); list each run once")
        seen[rr] = r
    return runs


def _read_runs(runs: list[Path]) -> tuple[pd.DataFrame, bool]:
    """Every run's rows, each labelled with its model; and whether they validated with the flip."""
    parts, cfg_of, cfgs = [], {}, []
    for r in runs:
        df, cfg = _read_run(r)
        cfgs.append(cfg)
        dup = df["image_id"].duplicated()
        if dup.any():
            raise RsnaError(f"{r / PRED_FILE}: image_id {int(df.image_id[dup].iloc[0])} appears "
                            f"{int((df.image_id == df.image_id[dup].iloc[0]).sum())} times in one "
                            "run; regenerate the file (one row per validation image)")
        for k, name in df[["model_key", "model_name"]].drop_duplicates().itertuples(index=False):
            cfg_of.setdefault(k, (name, cfg))
        parts.append(df)
    allr = pd.concat(parts, ignore_index=True)
    tta = _validation_tta(runs, cfgs)
    labels = _labels(cfg_of)
    allr["model"] = allr["model_key"].map(labels)
    return allr, tta


def _check_overlaps(allr: pd.DataFrame) -> None:
    """Each image once per model, and one label per image across the runs."""
    # each image once per model
    dup = allr.duplicated(["model", "image_id"], keep=False)
    if dup.any():
        first = allr[dup].iloc[0]
        where = allr[dup & (allr.model == first.model) & (allr.image_id == first.image_id)]
        a, b = list(where["run"])[:2]
        fa, fb = list(where["fold"])[:2]
        n = int(allr[dup].drop_duplicates(["model", "image_id"]).shape[0])
        raise RsnaError(f"image_id {int(first.image_id)} is in two runs of model {first.model!r}: "
                        f"{a} (fold {fa}) and {b} (fold {fb}) ({n} image(s) overlap); folds of one "
                        "model must not overlap: leave one of these runs out, or check that they "
                        "used the same split (seed, folds) and differ in fold")

    # the same labels in every run
    lab = allr.groupby("image_id")["cancer"].nunique()
    if (lab > 1).any():
        img = int(lab.index[lab > 1][0])
        rs = sorted(set(allr.loc[allr.image_id == img, "run"]))
        raise RsnaError(f"image_id {img}: its cancer label differs between runs {rs}; they were "
                        "trained on different train.csv files; use runs of one label set")


def _complete_images(allr: pd.DataFrame, runs: list[Path],
                     allow_missing: bool) -> tuple[pd.DataFrame, list[str], int]:
    """The models' predictions side by side (image x model) for the images every model scored."""
    model_labels = sorted(allr["model"].unique())
    wide = allr.pivot(index="image_id", columns="model", values="prediction")[model_labels]
    n_models = wide.notna().sum(axis=1)
    complete = n_models == len(model_labels)
    dropped = int((~complete).sum())
    if dropped and not allow_missing:
        lacking = {m: int(wide[m].isna().sum()) for m in model_labels if wide[m].isna().any()}
        example = int(wide.index[~complete][0])
        runs_of = {m: sorted(set(allr.loc[allr.model == m, "run"])) for m in lacking}
        raise RsnaError(f"{dropped} image(s) are not scored by every model (e.g. image_id "
                        f"{example}); missing per model: {lacking}, whose runs are {runs_of}; add "
                        "the missing folds, or pass allow_missing=True to tune on the images all "
                        "models scored")
    wide = wide[complete]
    if wide.empty:
        raise RsnaError(f"no image is scored by every model {model_labels} (runs "
                        f"{[str(r) for r in runs]}); these models were validated on disjoint "
                        "images: add their other folds")
    return wide, model_labels, dropped


def score_weights(aucs: dict[str, float]) -> dict[str, float]:
    """Each model's share of the ensemble's vote: its out-of-fold breast AUC above chance
    (AUC - 0.5; none at or below chance), normalised to sum to 1. Equal shares when no model
    is above chance or an AUC cannot be computed (one class): then nothing tells them apart."""
    edge = {m: (a - 0.5 if a == a and a is not None else float("nan")) for m, a in aucs.items()}
    if any(e != e for e in edge.values()) or not any(e > 0 for e in edge.values()):
        return {m: 1 / len(aucs) for m in aucs}
    total = sum(max(e, 0.0) for e in edge.values())
    return {m: max(e, 0.0) / total for m, e in edge.items()}


def _breast_auc(meta: pd.DataFrame, pred: pd.Series, agg: str = "mean") -> float:
    breast = metrics.breast_level(meta.assign(prediction=pred.to_numpy()), "prediction", "cancer",
                                  agg)
    return float(metrics.roc_auc(breast["cancer"], breast["prediction"]))


def _merged_table(allr: pd.DataFrame, wide: pd.DataFrame, model_labels: list[str],
                  weights: dict[str, float]) -> pd.DataFrame:
    meta = (allr.drop_duplicates("image_id").set_index("image_id")
            [["patient_id", "laterality", "prediction_id", "cancer"]])
    out = meta.loc[wide.index].copy()
    # the ensemble: the models' weighted mean (equal weights: their plain mean, as before)
    w = np.array([weights[m] for m in model_labels])
    out["prediction"] = (wide[model_labels].to_numpy() @ w / w.sum() if len(set(w)) > 1
                         else wide.mean(axis=1).to_numpy())
    out["n_models"] = len(model_labels)
    folds = allr.pivot(index="image_id", columns="model", values="fold")
    for m in model_labels:
        out[f"pred_{m}"] = wide[m].to_numpy()
        out[f"fold_{m}"] = folds.loc[wide.index, m].astype("Int64").to_numpy()
    out = (out.reset_index()
           [["patient_id", "image_id", "laterality", "prediction_id", "cancer", "prediction",
             "n_models"] + [c for m in model_labels for c in (f"pred_{m}", f"fold_{m}")]]
           .sort_values(["patient_id", "laterality", "image_id"], kind="mergesort")
           .reset_index(drop=True))
    return out


def _run_info(allr: pd.DataFrame, runs: list[Path]) -> list[dict]:
    run_info = []
    for r in runs:
        rows = allr[allr.run == str(r)]
        folds_r = sorted({int(f) for f in rows["fold"].dropna()})
        run_info.append({"run": str(r), "model": sorted(set(rows["model"]))[0]
                         if rows["model"].nunique() == 1 else sorted(set(rows["model"])),
                         "fold": folds_r[0] if len(folds_r) == 1 else (folds_r or None),
                         "images": int(len(rows))})
    return run_info


def _validation_tta(runs: list[Path], cfgs: list[dict | None]) -> bool:
    """Whether the runs' validation predictions average the horizontal flip (TrainConfig.tta;
    runs without the setting did not). Mixed runs would tune one threshold on two kinds of
    score: refused."""
    tta = {str(r): bool((c or {}).get("tta", False)) for r, c in zip(runs, cfgs)}
    if len(set(tta.values())) > 1:
        on = [r for r, v in tta.items() if v]
        off = [r for r, v in tta.items() if not v]
        raise RsnaError(f"runs {on} validated with the flip averaged in (tta) and {off} without; "
                        "one threshold needs one kind of score: retrain the latter with --tta "
                        "(or the former without)")
    return bool(next(iter(tta.values()), False))


# ----------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------

def ensemble_threshold(oof_df: pd.DataFrame, agg: str = "mean", beta: float = 1.0,
                       mode: str = "threshold") -> dict:
    """Tune one cut on the ensemble's breast-level OOF prediction (`metrics.breast_level` with
    `agg`, as the submission aggregates).

    mode "threshold": flag breasts with prediction >= `threshold` (metrics.best_threshold);
    mode "quantile": flag the top share `quantile` of breasts (metrics.best_quantile), the
    `binarize` string "quantile:q" of cut.binarize. Both keys are always given (the other
    is what the chosen cut amounts to on the OOF set); `binarize` says which to apply.
    Returns mode, agg, beta, threshold, quantile, binarize, pf1 (binarized, at the cut),
    prob_pf1 (unbinarized), auc, pr_auc, n_images, n_breasts, n_positives, models, runs,
    dropped_images."""
    if mode not in ("threshold", "quantile"):
        raise RsnaError(f"mode {mode!r}: choose threshold or quantile")
    if agg not in ("mean", "max"):
        raise RsnaError(f"agg {agg!r}: choose mean or max (the submission's aggregation)")
    missing = [c for c in ("cancer", "prediction") if c not in oof_df.columns]
    if missing or not ({"prediction_id"} <= set(oof_df.columns)
                       or {"patient_id", "laterality"} <= set(oof_df.columns)):
        raise RsnaError(f"OOF table lacks column(s) {missing or ['prediction_id']}; pass the "
                        "output of merge_oof (or an oof_predictions.csv)")
    breast = metrics.breast_level(oof_df, "prediction", "cancer", agg)
    y = breast["cancer"].to_numpy()
    p = breast["prediction"].to_numpy(dtype=np.float64)
    runs = list(oof_df.attrs.get("runs", []))
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        where = ", ".join(r["run"] for r in runs) or "the OOF table"
        raise RsnaError(f"{where}: no positive breast among {len(breast)}; a threshold cannot be "
                        "tuned without cancers: merge more folds or use labelled validation data")
    called = lambda t: int((p >= t).sum())   # noqa: E731
    if mode == "threshold":
        t, f = metrics.best_threshold(y, p, beta)
        q = called(t) / len(p)
        how = "threshold"
    else:
        q, f = metrics.best_quantile(y, p, beta)
        k = int(round(q * len(p)))
        t = float(np.sort(p)[::-1][k - 1]) if k > 0 else float("inf")
        how = f"quantile:{q!r}"
    return {
        "mode": mode, "agg": agg, "beta": float(beta),
        "threshold": float(t), "quantile": float(q), "binarize": how,
        "pf1": float(f), "prob_pf1": float(metrics.pfbeta(y, p, beta)),
        "auc": float(metrics.roc_auc(y, p)), "pr_auc": float(metrics.pr_auc(y, p)),
        "n_images": int(len(oof_df)), "n_breasts": int(len(breast)), "n_positives": n_pos,
        "models": list(oof_df.attrs.get("models", [])), "runs": runs,
        "dropped_images": int(oof_df.attrs.get("dropped_images", 0)),
        "tta": bool(oof_df.attrs.get("tta", False)),
        **{k: oof_df.attrs[k] for k in ("weighting", "weights", "model_auc", "recipe_weights")
           if k in oof_df.attrs},
    }


@dataclass
class OofConfig(Config):
    """The settings of `rsna oof` (its flags derive from these fields)."""

    KIND = "out-of-fold"

    runs: list = setting(help="training run folders: every fold of every model of the ensemble")
    out: str = setting("ensemble.json", "the ensemble file (oof_predictions.csv beside it)")
    agg: str = agg_setting("views -> breast, as the submission aggregates")
    mode: str = setting("threshold", "the cut: a threshold on the score, or the top quantile of "
                        "breasts", choices=("threshold", "quantile"))
    beta: float = setting(1.0, "F-beta that the cut maximises (1: the competition's pF1)", gt=0)
    calibration: str = setting("platt", "calibrator stored in the JSON for --output calibrated "
                               "(platt: logistic on the logit; see rsna_utils.infer.calibrate)",
                               choices=(*CALIBRATIONS, "none"))
    allow_missing: bool = setting(False, "tune on the images every model scored when some "
                                  "folds are missing")
    weighting: str = setting("auc", "each model's vote: by its out-of-fold breast AUC above "
                             "chance (a model at chance gets none), or equal",
                             choices=WEIGHTINGS)

    def __post_init__(self):
        if isinstance(self.runs, (str, Path)):
            self.runs = [self.runs]
        self.check_fields()

    def run(self) -> dict:
        return merge_runs(self)


def write_ensemble(run_dirs: list[str | Path], out_json: str | Path, **settings) -> dict:
    """`merge_runs` with the `OofConfig` of these arguments (calibration None: "none")."""
    if "calibration" in settings and settings["calibration"] is None:
        settings["calibration"] = "none"
    runs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    return merge_runs(OofConfig(runs=runs, out=out_json, **settings))


def merge_runs(cfg: OofConfig) -> dict:
    """merge_oof + ensemble_threshold; writes `cfg.out` (the cut inference applies, with the
    metrics and the runs) and the merged oof_predictions.csv beside it. Returns the dict (with
    "oof_csv" added).

    `cfg.calibration` ("platt", "temperature", "isotonic" or "none"): also fit a calibrator on
    the same breast-level OOF predictions (`calibrate.calibrate_oof`) and store it, plain JSON
    numbers, under "calibrator", for `rsna predict --output calibrated`. The threshold is for
    the raw prediction (calibration is monotone: it would flag the same breasts). When no
    calibrator can be fitted, "calibrator" is None and "calibration_error" says why."""
    agg, calibration = cfg.agg, None if cfg.calibration == "none" else cfg.calibration
    df = merge_oof(cfg.runs, allow_missing=cfg.allow_missing, weighting=cfg.weighting, agg=agg)
    res = ensemble_threshold(df, agg=agg, beta=cfg.beta, mode=cfg.mode)
    if calibration is not None:
        try:
            res["calibrator"] = calibrate_oof(df, agg=agg, method=calibration)
        except RsnaError as e:      # e.g. an untrained smoke-test model: keep the threshold
            res["calibrator"], res["calibration_error"] = None, str(e)
    out_json = Path(cfg.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    oof_csv = out_json.parent / OOF_FILE
    res["oof_csv"] = str(oof_csv)
    write_atomic(oof_csv, df.to_csv(index=False))
    Ensemble(res).write(out_json)
    return res


