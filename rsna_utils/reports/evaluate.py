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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, setting
from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import with_prediction_id
from rsna_utils.learn import metrics

BREAKDOWN_COLUMNS = ("site_id", "machine_id", "view", "density", "age")   # joined from the meta
BREAST_BREAKDOWNS = ("site_id", "machine_id", "density", "age_band")   # a breast's attribute
IMAGE_BREAKDOWNS = ("view",)                                            # differs per image
AGE_BANDS = (50, 60, 70)            # -> <50, 50-59, 60-69, 70+
METRICS = ("auc", "pr_auc", "pf1", "f1", "sensitivity", "specificity", "brier", "ece")
N_BINS = 10
CHUNK = 100                         # resamples computed at once (memory: CHUNK x rows floats)


# ----------------------------------------------------------------------------------------
# Reading and joining
# ----------------------------------------------------------------------------------------

def _read(table, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(table, pd.DataFrame):
        return table.copy(), f"the {what} table"
    path = Path(table)
    if not path.exists():
        raise RsnaError(f"{path}: {what} file not found")
    try:
        return pd.read_csv(path), str(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: cannot be read as CSV ({type(e).__name__}); pass the {what} "
                        "CSV") from None


def _with_prediction_id(d: pd.DataFrame) -> pd.DataFrame:
    if {"patient_id", "laterality"} <= set(d.columns):
        d = with_prediction_id(d)
    return d


def load_predictions(predictions, meta=None) -> pd.DataFrame:
    """The predictions (CSV path or DataFrame) with cancer, prediction, prediction_id,
    patient_id and what `meta` (train.csv) adds: its columns the predictions lack, joined on
    image_id (on prediction_id when the predictions have no image_id). Adds `age_band`.
    Rows with no prediction (unreadable images) are dropped; attrs["dropped_nan"] counts them."""
    df, name = _read(predictions, "predictions")
    if "prediction" not in df:
        hint = (" (a submission.csv: its `cancer` column is the prediction, and the labels come "
                "from --meta)" if list(df.columns) == ["prediction_id", "cancer"] else "")
        raise RsnaError(f"{name}: no `prediction` column{hint}; pass val_predictions.csv, "
                        "oof_predictions.csv or the _images.csv of `rsna predict`")
    df = _with_prediction_id(df)
    if meta is not None:
        m, mname = _read(meta, "meta")
        m = _with_prediction_id(m)
        key = "image_id" if "image_id" in df and "image_id" in m else "prediction_id"
        if key not in df or key not in m:
            raise RsnaError(f"{name} and {mname} share neither image_id nor prediction_id "
                            "(patient_id + laterality); pass train.csv as the meta")
        wanted = ("cancer", "patient_id", "laterality", "prediction_id") + BREAKDOWN_COLUMNS
        add = [c for c in wanted if c in m and c not in df and c != key]
        if add:
            m = m.assign(**{key: m[key].astype(str)})
            side = m[[key] + add].groupby(key, sort=False).first()
            joined = df[key].astype(str).isin(side.index)
            if not joined.any():
                raise RsnaError(f"none of the {len(df)} {key}s of {name} is in {mname}; pass the "
                                "train.csv these predictions were made on")
            df = df.assign(_key=df[key].astype(str)).join(side, on="_key").drop(columns="_key")
            df.attrs["unmatched_meta"] = int((~joined).sum())
        df = _with_prediction_id(df)
    if "cancer" not in df:
        raise RsnaError(f"{name}: no `cancer` label column; pass meta_csv=train.csv (--meta) to "
                        "join it on image_id")
    if "prediction_id" not in df:
        raise RsnaError(f"{name}: no prediction_id (nor patient_id + laterality) to group views "
                        "into breasts; add them or pass --meta train.csv")
    if "patient_id" not in df:       # prediction_id is f"{patient_id}_{laterality}"
        df["patient_id"] = df["prediction_id"].astype(str).str.rsplit("_", n=1).str[0]
    y = pd.to_numeric(df["cancer"], errors="coerce")
    if y.isna().any() or not y.isin([0, 1]).all():
        bad = int((y.isna() | ~y.isin([0, 1])).sum())
        raise RsnaError(f"{name}: {bad} row(s) whose cancer label is missing or not 0/1 (e.g. "
                        f"{df.loc[y.isna() | ~y.isin([0, 1]), 'prediction_id'].iloc[0]!r}); "
                        "predictions not in the meta CSV? pass the train.csv they come from")
    p = pd.to_numeric(df["prediction"], errors="coerce")
    if ((p < 0) | (p > 1)).any():
        raise RsnaError(f"{name}: predictions outside [0, 1] (min {p.min():.3g}, max "
                        f"{p.max():.3g}); these look like logits: pass probabilities "
                        "(sigmoid of the logit)")
    df["cancer"] = y.astype("int64")
    df["prediction"] = p.astype("float64")
    dropped = int(p.isna().sum())
    df = df[p.notna()].reset_index(drop=True)
    if "age" in df:
        df["age_band"] = age_band(df["age"])
    df.attrs["dropped_nan"] = dropped
    df.attrs["source"] = name
    return df


def age_band(age, bands=AGE_BANDS) -> pd.Series:
    """Age -> "<50", "50-59", "60-69", "70+" (for the default bands); "missing" when NaN."""
    a = pd.to_numeric(pd.Series(age), errors="coerce")
    labels = age_band_labels(bands)
    cut = pd.cut(a, [-np.inf, *bands, np.inf], right=False, labels=labels)
    return cut.astype(object).where(a.notna(), "missing")


def age_band_labels(bands=AGE_BANDS) -> list[str]:
    return ([f"<{bands[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(bands, bands[1:])]
            + [f"{bands[-1]}+"])


def breast_table(df: pd.DataFrame, agg: str = "mean") -> pd.DataFrame:
    """One row per breast: the views' predictions aggregated (`metrics.breast_level`), the
    label the max, patient_id and the breast attributes (first non-missing value)."""
    b = metrics.breast_level(df, "prediction", "cancer", agg)
    attrs = [c for c in ("patient_id",) + BREAST_BREAKDOWNS if c in df]
    first = df.groupby("prediction_id", sort=False)[attrs].first()
    return b.join(first, on="prediction_id")


# ----------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------

def patient_bootstrap_counts(n_patients: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n_patients) int32: how often each patient is drawn in each resample (n_patients
    draws with replacement). Resample b is `rng.integers(0, n_patients, n_patients)` of
    `np.random.default_rng(seed)`, the b-th such draw."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, n_patients), np.int32)
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
    return out


def resampled_metrics(y, p, weights, threshold: float, beta: float = 1.0,
                      n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Every metric of METRICS for each row of `weights` (resamples x rows, the rows'
    multiplicities), as if the rows were repeated that often: one array per metric.

    AUC: the Mann-Whitney form of the ROC trapezoid (a tie counts half), as roc_auc_score;
    PR AUC: recall steps times precision at each distinct positive score, as
    average_precision_score; NaN where a class is missing. Two matrix products (one sparse)
    and cumulative sums over the distinct positive scores: no per-resample sort or loop."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pos = y == 1
    pc = np.clip(p, 0, 1)
    called = p >= threshold
    bins = metrics.calibration_bin(p, n_bins)
    # every weighted sum at once: w @ V
    cols = [pos, ~pos, pc * pos, pc * ~pos, called & pos, called & ~pos, (p - y) ** 2]
    v = np.zeros((len(y), len(cols) + n_bins))
    for j, c in enumerate(cols):
        v[:, j] = c
    v[np.arange(len(y)), len(cols) + bins] = pc - y     # per bin: sum of (p - y)
    s = w @ v
    n_pos, n_neg, ctp, cfp, t_tp, t_fp, sq = s[:, :len(cols)].T
    total = n_pos + n_neg

    # ranking: per distinct positive score s_g (ascending), the weight of its positives and of
    # the negatives below it and tied with it. One sparse matrix sends each row to its bucket:
    # positives to their group, negatives to "between s_g-1 and s_g" (2g) or "tied with s_g"
    # (2g+1); one product sums every resample's weights per bucket.
    from scipy import sparse
    s_g = np.unique(p[pos])
    g = len(s_g)
    j = np.searchsorted(s_g, p)                                   # scores s_g below p
    tied = (j < g) & (s_g[np.minimum(j, g - 1)] == p) if g else np.zeros(len(p), bool)
    bucket = np.where(pos, 2 * g + 1 + j, np.where(tied, 2 * j + 1, 2 * j))
    m = sparse.csr_matrix((np.ones(len(p)), (np.arange(len(p)), bucket)), shape=(len(p), 3 * g + 1))
    sums = np.asarray(w @ m)
    cneg = np.cumsum(sums[:, :2 * g + 1], axis=1)
    below, upto = cneg[:, 0:2 * g:2], cneg[:, 1:2 * g:2]         # negatives < s_g, <= s_g
    wpos = sums[:, 2 * g + 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wpos * (below + 0.5 * (upto - below))).sum(1) / (n_pos * n_neg)
        tp = n_pos[:, None] - np.cumsum(wpos, axis=1) + wpos     # positives scored >= s_g
        fp = n_neg[:, None] - below                   # negatives scored >= s_g
        ap = (wpos * np.where(tp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)).sum(1) / n_pos
        auc[(n_pos == 0) | (n_neg == 0)] = np.nan
        ap[n_pos == 0] = np.nan
        b2 = beta * beta
        prec, rec = ctp / (ctp + cfp), ctp / n_pos      # probabilistic F-beta (metrics.pfbeta)
        pf = np.where((ctp > 0) & (n_pos > 0), (1 + b2) * prec * rec / (b2 * prec + rec), 0.0)
        f = np.where(t_tp > 0, (1 + b2) * t_tp / ((1 + b2) * t_tp + b2 * (n_pos - t_tp) + t_fp), 0.0)
        sens = np.where(n_pos > 0, t_tp / n_pos, np.nan)
        spec = np.where(n_neg > 0, (n_neg - t_fp) / n_neg, np.nan)
        brier = sq / total
        ece = np.abs(s[:, len(cols):]).sum(1) / total
    return {"auc": auc, "pr_auc": ap, "pf1": pf, "f1": f, "sensitivity": sens,
            "specificity": spec, "brier": brier, "ece": ece}


def point_metrics(y, p, threshold: float, beta: float = 1.0, n_bins: int = N_BINS) -> dict:
    """The same metrics on the data itself, by the plain functions (scikit-learn for the AUCs)."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    called = p >= threshold
    n_pos, n_neg = int((y == 1).sum()), int((y != 1).sum())
    return {"auc": metrics.roc_auc(y, p), "pr_auc": metrics.pr_auc(y, p),
            "pf1": metrics.pfbeta(y, p, beta), "f1": metrics.fbeta_at(y, p, threshold, beta),
            "sensitivity": float((called & (y == 1)).sum() / n_pos) if n_pos else float("nan"),
            "specificity": float((~called & (y != 1)).sum() / n_neg) if n_neg else float("nan"),
            "brier": metrics.brier_score(y, p),
            "ece": metrics.expected_calibration_error(y, p, n_bins)}


def _intervals(values: dict[str, np.ndarray], ci: float) -> dict:
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for k, v in values.items():
        ok = v[np.isfinite(v)]
        out[f"{k}_low"], out[f"{k}_high"] = (np.percentile(ok, [lo, hi]) if ok.size
                                             else (np.nan, np.nan))
    out["n_boot_valid"] = int(np.isfinite(values["auc"]).sum())
    return out


def _summarise(y, p, patients, counts, threshold, beta, ci) -> dict:
    """Point estimates and intervals of one group (its rows; `patients`: their index into
    the columns of `counts`)."""
    boot = {k: [] for k in METRICS}
    for s in range(0, counts.shape[0], CHUNK):
        r = resampled_metrics(y, p, counts[s:s + CHUNK][:, patients], threshold, beta)
        for k in METRICS:
            boot[k].append(r[k])
    boot = {k: np.concatenate(v) for k, v in boot.items()}
    row = {"n": int(len(y)), "n_patients": int(len(np.unique(patients))),
           "n_positives": int((np.asarray(y) == 1).sum())}
    row["prevalence"] = row["n_positives"] / row["n"] if row["n"] else float("nan")
    point = point_metrics(y, p, threshold, beta)
    iv = _intervals(boot, ci)
    for k in METRICS:
        row[k], row[f"{k}_low"], row[f"{k}_high"] = point[k], iv[f"{k}_low"], iv[f"{k}_high"]
    row["n_boot_valid"] = iv["n_boot_valid"]
    return row


def patient_intervals(y, p, patients, threshold: float = 0.5, n_boot: int = 1000,
                      seed: int = 0, beta: float = 1.0, ci: float = 0.95) -> dict:
    """Every metric of METRICS on these rows (one per breast, say) with its patient-bootstrap
    interval: `patients` gives each row's patient, and a resample draws patients with
    replacement, keeping all their rows (the bootstrap of `evaluate_predictions`). Returns
    n, n_patients, n_positives, prevalence, each metric with _low/_high, n_boot_valid.
    On 0/1 predictions (a binarised submission) pf1 is the F1 of those calls, and
    sensitivity/specificity at `threshold` 0.5 are theirs."""
    codes, uniq = pd.factorize(pd.Series(patients).astype(str))
    counts = patient_bootstrap_counts(len(uniq), n_boot, seed)
    return _summarise(np.asarray(y), np.asarray(p, dtype=np.float64), codes, counts,
                      float(threshold), beta, ci)


def compare_auc(y, p_a, p_b, patients, n_boot: int = 2000, seed: int = 0,
                ci: float = 0.95) -> dict:
    """Is model B's ROC AUC higher than model A's on the same rows? The difference AUC(B) -
    AUC(A) with a PAIRED patient-bootstrap interval: each resample draws patients with
    replacement and scores both models on the same drawn rows, so what the two share (the
    hard cases of this set) cancels. `patients`: one id per row (rows of one patient move
    together). Returns auc_a, auc_b, difference, difference_low/high (the `ci` percentile
    interval), p_not_better (share of resamples where B does not beat A), n_boot_valid."""
    r = compare_metric(y, p_a, p_b, patients, "auc", n_boot, seed, ci)
    return {"auc_a": r.pop("a"), "auc_b": r.pop("b"), **{k: v for k, v in r.items() if k != "metric"}}


def compare_metric(y, p_a, p_b, patients, metric: str = "auc", n_boot: int = 2000,
                   seed: int = 0, ci: float = 0.95) -> dict:
    """`compare_auc` for any metric of METRICS computed without a threshold: auc, pr_auc, or
    pf1 (probabilistic F1; on 0/1 predictions, such as a binarised submission, it is the F1
    of those calls). Returns metric, a, b, difference, difference_low/high, p_not_better,
    n_boot_valid."""
    if metric not in ("auc", "pr_auc", "pf1", "brier"):
        raise RsnaError(f"compare_metric: metric {metric!r}: choose auc, pr_auc, pf1 or brier")
    y = np.asarray(y)
    p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    if not (len(y) == len(p_a) == len(p_b) == len(patients)):
        raise RsnaError(f"compare_auc: labels ({len(y)}), predictions ({len(p_a)}, {len(p_b)}) "
                        f"and patients ({len(patients)}) must be the same rows")
    bad = sorted(set(np.unique(y).tolist()) - {0, 1})
    if bad:
        raise RsnaError(f"compare_auc: labels must be 0 or 1, found {bad[:3]}; map them first")
    if len(np.unique(y)) < 2:
        raise RsnaError("compare_auc: the labels hold one class only; AUC needs positives and "
                        "negatives")
    for name, p in (("first", p_a), ("second", p_b)):
        if not np.isfinite(p).all():
            raise RsnaError(f"compare_auc: the {name} model's predictions hold "
                            f"{int((~np.isfinite(p)).sum())} NaN/inf; drop those rows (or fill "
                            "them as the submission does) for both models")
    patients = pd.Series(patients)
    if patients.isna().any():
        raise RsnaError(f"compare_auc: {int(patients.isna().sum())} row(s) have no patient id; "
                        "every row needs one (rows of one patient are resampled together)")
    codes, uniq = pd.factorize(patients)
    counts = patient_bootstrap_counts(len(uniq), n_boot, seed)
    diff = []
    for s in range(0, n_boot, CHUNK):
        w = counts[s:s + CHUNK][:, codes]
        diff.append(resampled_metrics(y, p_b, w, 0.5)[metric]
                    - resampled_metrics(y, p_a, w, 0.5)[metric])
    d = np.concatenate(diff)
    d = d[np.isfinite(d)]                       # a resample with one class has no AUC
    a, b = (point_metrics(y, p, 0.5)[metric] for p in (p_a, p_b))
    lo, hi = (np.percentile(d, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]) if d.size
              else (np.nan, np.nan))
    better = (d <= 0) if metric != "brier" else (d >= 0)      # a lower Brier score is better
    return {"metric": metric, "a": float(a), "b": float(b), "difference": float(b - a),
            "difference_low": float(lo), "difference_high": float(hi),
            "p_not_better": float(better.mean()) if d.size else float("nan"),
            "n_boot_valid": int(d.size)}


# ----------------------------------------------------------------------------------------
# Curves with bands
# ----------------------------------------------------------------------------------------

def curve_bands(y, p, counts_rows, ci: float = 0.95, points: int = 201) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROC (TPR on an FPR grid, linear between the curve's corners) and PR (interpolated
    precision: the best precision at recall >= r) on grids, the point curve and its
    percentile band over the resamples (`counts_rows`: resamples x rows multiplicities)."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    grid = np.linspace(0, 1, points)

    def roc_at(fpr, tpr):
        return np.interp(grid, fpr, tpr)

    def pr_at(recall, precision):          # recall ascending
        best = np.maximum.accumulate(precision[::-1])[::-1]
        i = np.searchsorted(recall, grid, side="left")
        return np.where(i < len(best), best[np.minimum(i, len(best) - 1)], 0.0)

    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    roc_point, pr_point = roc_at(fpr, tpr), pr_at(rec[::-1], prec[::-1])
    order = np.argsort(-p, kind="mergesort")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    pos = (y == 1)[order]
    rocs, prs = [], []
    for s in range(0, counts_rows.shape[0], CHUNK):
        ws = np.asarray(counts_rows[s:s + CHUNK], dtype=np.float64)[:, order]
        tp = np.cumsum(np.add.reduceat(ws * pos, starts, axis=1), axis=1)
        fp = np.cumsum(np.add.reduceat(ws * ~pos, starts, axis=1), axis=1)
        for t, f in zip(tp, fp):
            if t[-1] == 0 or f[-1] == 0:
                continue
            rocs.append(roc_at(np.r_[0, f / f[-1]], np.r_[0, t / t[-1]]))
            called = t + f
            prec_b = np.where(called > 0, t / np.where(called > 0, called, 1), 1.0)
            prs.append(pr_at(np.r_[0, t / t[-1]], np.r_[1.0, prec_b]))
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    rb = np.percentile(np.array(rocs), [lo, hi], axis=0) if rocs else np.full((2, points), np.nan)
    pb = np.percentile(np.array(prs), [lo, hi], axis=0) if prs else np.full((2, points), np.nan)
    roc = pd.DataFrame({"fpr": grid, "tpr": roc_point, "tpr_low": rb[0], "tpr_high": rb[1]})
    pr = pd.DataFrame({"recall": grid, "precision": pr_point, "precision_low": pb[0],
                       "precision_high": pb[1]})
    return roc, pr


# ----------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------

@dataclass
class EvaluateConfig(Config):
    """The settings of `rsna evaluate` (its flags derive from these fields)."""

    KIND = "evaluation"

    predictions: str = setting(help="val_predictions.csv, oof_predictions.csv or the "
                               "_images.csv of rsna predict")
    out: str = setting(help="output folder (CSV, JSON and PNG figures)")
    meta: str | None = setting(None, "train.csv: labels, site, machine, view, density, age the "
                               "predictions lack (joined on image_id)")
    threshold: float | None = setting(None, "for F1 / sensitivity / specificity (default: tuned "
                                      "on these breasts)", ge=0, le=1)
    agg: str = setting("mean", "views -> breast", choices=("mean", "max"))
    n_boot: int = setting(1000, "bootstrap resamples of patients", ge=1)
    seed: int = setting(0, "seed of the bootstrap")

    def __post_init__(self):
        self.check_fields()

    def run(self) -> dict:
        return evaluate_predictions(self.predictions, self.out, meta_csv=self.meta,
                                    threshold=self.threshold, n_boot=self.n_boot, seed=self.seed,
                                    agg=self.agg)


def evaluate_predictions(predictions, out_dir=None, meta_csv=None, threshold: float | None = None,
                         n_boot: int = 1000, seed: int = 0, agg: str = "mean", beta: float = 1.0,
                         ci: float = 0.95, population: str | None = None) -> dict:
    """Evaluate labelled predictions (CSV path or DataFrame) as a study would report them.

    Returns a dict: "headline" (the breast-level row: each metric with _low/_high, n, the
    threshold), "metrics" (DataFrame: one row per breakdown/group/level), "roc" and "pr"
    (breast-level curves on a grid with their bands), "reliability" (the breast-level
    reliability table), "figures" (name -> PNG path) and "files" (name -> CSV/JSON path),
    "skipped" (breakdown -> why). With `out_dir` the tables, figures and summary.json are
    written there; without, nothing is written. `population`: whose predictions these are, for
    the headline and the figures' titles (default from the file's name, `population_of`)."""
    if agg not in ("mean", "max"):
        raise RsnaError(f"agg {agg!r}: choose mean or max (the submission's aggregation)")
    if n_boot < 1:
        raise RsnaError(f"n_boot {n_boot}: give at least 1 (1000 for reported intervals)")
    df = load_predictions(predictions, meta_csv)
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
    if out_dir is not None:
        _write(res, Path(out_dir))
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
