"""Evaluation as a study reports it: point estimates with bootstrap 95% intervals, by subgroup.

Input: labelled predictions, one row per image (a run's val_predictions.csv, `rsna oof`'s
oof_predictions.csv, the `<out>_images.csv` of `rsna predict --labels`) or one row per breast
(prediction_id). Columns the predictions lack (the label, site_id, machine_id, view, density,
age) are joined from train.csv on image_id (on prediction_id for breast rows).

What is reported, at breast level (the views aggregated as the submission aggregates them, the
level the competition scores) and, for the whole set and per view, at image level:
ROC AUC, PR AUC (average precision), probabilistic F1 (the competition metric), F1, sensitivity
and specificity at one threshold, Brier score and expected calibration error (ECE, 10 bins).

Intervals: percentile bootstrap over PATIENTS. A resample draws patients with replacement and
keeps all their breasts and images, so the two breasts (four or more images) of one woman move
together, as they are not independent. One set of resamples serves every subgroup (a subgroup's
resample is the drawn patients' rows in that subgroup). The metrics of a resample are computed
from the patient multiplicities as integer weights, vectorised over resamples (one sort per
subgroup, cumulative sums): the same numbers as scikit-learn on the duplicated rows, without a
Python loop per resample. A resample with one class only has no AUC; intervals use the rest
(`n_boot_valid`).

The threshold: the one given (e.g. the out-of-fold ensemble threshold of ensemble.json), else
the best-F1 threshold of these breasts; then F1 / sensitivity / specificity are optimistic,
having been tuned on the data they are measured on (`threshold_source` says which).

The pieces live in their own modules and are re-exported here, so `rsna_utils.reports.evaluate`
keeps every name it had: reading and joining the predictions (`reports.labelled`), the
bootstrap, the comparisons of two models and the curves' bands (`reports.bootstrap`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, agg_setting, setting
from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import with_prediction_id  # noqa: F401 - a name evaluate had
from rsna_utils.learn import metrics
from rsna_utils.reports.bootstrap import (  # noqa: F401
    CHUNK, METRICS, N_BINS, _intervals, _summarise, compare_auc, compare_metric, curve_bands,
    patient_bootstrap_counts, patient_intervals, point_metrics, resampled_metrics)
from rsna_utils.reports.labelled import (  # noqa: F401
    AGE_BANDS, BREAKDOWN_COLUMNS, BREAST_BREAKDOWNS, IMAGE_BREAKDOWNS, _read,
    _with_prediction_id, age_band, age_band_labels, breast_table, load_predictions)

# ----------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------

@dataclass
class EvaluateConfig(Config):
    """The settings of `rsna evaluate` (its flags derive from these fields) and of
    `evaluate_predictions`: their defaults are spelled here only."""

    KIND = "evaluation"

    predictions: str = setting(help="val_predictions.csv, oof_predictions.csv or the "
                               "_images.csv of rsna predict")
    out: str | None = setting(help="output folder (CSV, JSON and PNG figures); None: write "
                              "nothing, return the tables")
    meta: str | None = setting(None, "train.csv: labels, site, machine, view, density, age the "
                               "predictions lack (joined on image_id)")
    threshold: float | None = setting(None, "for F1 / sensitivity / specificity (default: tuned "
                                      "on these breasts)", ge=0, le=1)
    agg: str = agg_setting("views -> breast")
    n_boot: int = setting(1000, "bootstrap resamples of patients", ge=1)
    seed: int = setting(0, "seed of the bootstrap")
    beta: float = setting(1.0, "F-beta of the tuned threshold (1: the competition's pF1)", gt=0)
    ci: float = setting(0.95, "level of the intervals", gt=0, lt=1)
    population: str | None = setting(None, "whose predictions these are, for the headline and "
                                     "the figures' titles (default: from the file's name)")

    def __post_init__(self):
        self.check_fields()

    def run(self) -> dict:
        return evaluate(self)


def evaluate_predictions(predictions, out_dir=None, meta_csv=None, **settings) -> dict:
    """`evaluate` with the `EvaluateConfig` of these arguments; `predictions` and `meta_csv`
    may be DataFrames instead of CSV paths."""
    def name(x):
        return x if x is None or isinstance(x, (str, os.PathLike)) else f"a {type(x).__name__}"
    cfg = EvaluateConfig(predictions=name(predictions), out=out_dir, meta=name(meta_csv),
                         **settings)
    return evaluate(cfg, predictions, meta_csv)


def evaluate(cfg: EvaluateConfig, predictions=None, meta=None) -> dict:
    """Evaluate labelled predictions (`cfg.predictions`, or the DataFrame `predictions`) as a
    study would report them.

    Returns a dict: "headline" (the breast-level row: each metric with _low/_high, n, the
    threshold), "metrics" (DataFrame: one row per breakdown/group/level), "roc" and "pr"
    (breast-level curves on a grid with their bands), "reliability" (the breast-level
    reliability table), "figures" (name -> PNG path) and "files" (name -> CSV/JSON path),
    "skipped" (breakdown -> why). With `cfg.out` the tables, figures and summary.json are
    written there; without, nothing is written. `cfg.population`: whose predictions these are,
    for the headline and the figures' titles (default from the file's name, `population_of`)."""
    threshold, n_boot, seed, agg = cfg.threshold, cfg.n_boot, cfg.seed, cfg.agg
    beta, ci, population = cfg.beta, cfg.ci, cfg.population
    df = load_predictions(cfg.predictions if predictions is None else predictions,
                          cfg.meta if meta is None else meta)
    image_level = "image_id" in df
    breast = breast_table(df, agg)
    n_pos = int(breast["cancer"].sum())
    if n_pos == 0 or n_pos == len(breast):
        which = "positive" if n_pos == 0 else "negative"
        raise RsnaError(f"{df.attrs['source']}: no {which} breast among {len(breast)}; AUC, "
                        "sensitivity and specificity need both classes: evaluate labelled data "
                        "with cancers and normals (e.g. the out-of-fold predictions of all folds)")
    source = "given"
    if threshold is None:
        threshold, _ = metrics.best_threshold(breast["cancer"], breast["prediction"], beta)
        source = "tuned on these breasts (optimistic)"
    threshold = float(threshold)

    patients, pidx = np.unique(df["patient_id"].astype(str), return_inverse=True)
    counts = patient_bootstrap_counts(len(patients), n_boot, seed)
    code = dict(zip(patients, range(len(patients))))
    bpidx = breast["patient_id"].astype(str).map(code).to_numpy()

    rows, skipped = [], {}

    def add(breakdown, group, level, d, idx):
        r = _summarise(d["cancer"].to_numpy(), d["prediction"].to_numpy(), idx, counts,
                       threshold, beta, ci)
        rows.append({"breakdown": breakdown, "group": str(group), "level": level, **r})

    add("all", "all", "breast", breast, bpidx)
    if image_level:
        add("all", "all", "image", df, pidx)
    for col in BREAST_BREAKDOWNS:
        if col not in breast:
            skipped[col] = (f"no {'age' if col == 'age_band' else col} column; pass "
                            "meta_csv=train.csv (--meta) to join it")
            continue
        values = breast[col].astype(object).where(breast[col].notna(), "missing")
        for g in _sorted_groups(values):
            m = (values == g).to_numpy()
            add(col, g, "breast", breast[m], bpidx[m])
    for col in IMAGE_BREAKDOWNS:
        if not image_level or col not in df:
            skipped[col] = (f"no {col} column (image level); pass image rows and "
                            "meta_csv=train.csv (--meta)")
            continue
        values = df[col].astype(object).where(df[col].notna(), "missing")
        for g in _sorted_groups(values):
            m = (values == g).to_numpy()
            add(col, g, "image", df[m], pidx[m])
    table = pd.DataFrame(rows)
    table.insert(3, "threshold", threshold)

    yb, pb = breast["cancer"].to_numpy(), breast["prediction"].to_numpy()
    roc, pr = curve_bands(yb, pb, counts[:, bpidx], ci)
    reliability = metrics.reliability_table(yb, pb, N_BINS)
    headline = {k: (v.item() if hasattr(v, "item") else v) for k, v in table.iloc[0].items()}
    headline.update(threshold_source=source, agg=agg, beta=beta, ci=ci, n_boot=n_boot, seed=seed,
                    dropped_nan=int(df.attrs.get("dropped_nan", 0)),
                    unmatched_meta=int(df.attrs.get("unmatched_meta", 0)),
                    source=df.attrs["source"],
                    population=population or population_of(df.attrs["source"]))
    res = {"headline": headline, "metrics": table, "roc": roc, "pr": pr,
           "reliability": reliability, "figures": {}, "files": {}, "skipped": skipped}
    if cfg.out is not None:
        _write(res, Path(cfg.out))
    return res


def population_of(source: str) -> str:
    """Whose predictions a file holds, by the name the pipeline gives it: `rsna oof`'s
    oof_predictions.csv (out-of-fold training patients), a run's val_predictions.csv (its
    validation patients), `rsna predict --labels`'s <out>_images.csv (held-out test patients)."""
    name = Path(str(source)).name.lower()
    if "oof" in name or "out_of_fold" in name:
        return "out-of-fold training patients"
    if name.startswith("val_predictions"):
        return "validation patients"
    if name.endswith("_images.csv"):
        return "held-out test patients"
    return "labelled patients"


def _sorted_groups(values: pd.Series) -> list:
    """Group values in a stable order: numbers ascending, then strings, "missing" last."""
    vals = [v for v in pd.unique(values) if v != "missing"]
    rank = {b: i for i, b in enumerate(age_band_labels())}
    vals.sort(key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0,
                             rank.get(v, len(rank)), str(v)))
    return vals + (["missing"] if (values == "missing").any() else [])


def _write(res: dict, out: Path) -> None:
    from rsna_utils.reports import plots
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out / "metrics.csv", "roc": out / "roc_curve.csv",
             "pr": out / "pr_curve.csv", "reliability": out / "reliability.csv",
             "summary": out / "summary.json"}
    for k in ("metrics", "roc", "pr", "reliability"):
        res[k].to_csv(files[k], index=False)
    files["summary"].write_text(json.dumps(_plain({"headline": res["headline"],
                                                   "skipped": res["skipped"]}), indent=2) + "\n")
    h = res["headline"]
    figs = {"roc_pr": plots.roc_pr_bands(res["roc"], res["pr"], h),
            "reliability": plots.reliability_diagram(res["reliability"], h),
            "breakdown": plots.breakdown_forest(res["metrics"], population=h.get("population"))}
    for name, fig in figs.items():
        path = out / f"{name}.png"
        plots.save(fig, path)
        plots.close(fig)
        res["figures"][name] = str(path)
    res["files"] = {k: str(v) for k, v in files.items()}


def _plain(d):
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (np.floating, float)):
        return float(d) if np.isfinite(d) else None
    if isinstance(d, np.integer):
        return int(d)
    return d
