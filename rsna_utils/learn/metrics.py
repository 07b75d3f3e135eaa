"""The competition metric (probabilistic F-beta) and the usual classification metrics, at image
level and at breast level (`prediction_id` = f"{patient_id}_{laterality}")."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rsna_utils.core.table import with_prediction_id


def pfbeta(labels, predictions, beta: float = 1.0) -> float:
    """Probabilistic F-beta exactly as the Kaggle metric: predictions clipped to [0, 1],
    pTP = sum(p[y == 1]), pFP = sum(p[y == 0]), precision = pTP / (pTP + pFP),
    recall = pTP / sum(y); 0 when either is 0."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(predictions, dtype=np.float64).ravel(), 0.0, 1.0)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    ctp = float(p[y == 1].sum())
    cfp = float(p[y != 1].sum())
    y_count = float((y == 1).sum())
    if y_count == 0 or ctp + cfp == 0:
        return 0.0
    precision = ctp / (ctp + cfp)
    recall = ctp / y_count
    if precision <= 0 or recall <= 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


def fbeta_at(labels, predictions, threshold: float, beta: float = 1.0) -> float:
    """F-beta of the predictions binarized at `threshold` (>= counts as positive)."""
    return pfbeta(labels, (np.asarray(predictions) >= threshold).astype(float), beta)


def _fbeta_counts(tp, fp, n_pos, beta: float) -> np.ndarray:
    """Binarized F-beta from counts: (1+b2)TP / ((1+b2)TP + b2 FN + FP); 0 where undefined."""
    b2 = beta * beta
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    num = (1 + b2) * tp
    den = num + b2 * (n_pos - tp) + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where((den > 0) & (tp > 0), num / np.where(den > 0, den, 1.0), 0.0)
    return f


def _threshold_curve(labels, predictions, beta: float = 1.0,
                     thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Candidate thresholds (ascending), the binarized F-beta at each ("score >= t is
    positive"), the number of predictions called positive at each, and n.

    Candidates: every distinct finite score, or the given `thresholds`. NaN predictions are
    never positive (as `fbeta_at`), but a NaN-scored cancer still counts as a false negative.
    Sort once, then suffix sums give TP/FP at every candidate: O((n + m) log n)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    pos = y == 1
    n_pos = int(pos.sum())
    ok = ~np.isnan(p)
    p, pos = p[ok], pos[ok]
    order = np.argsort(p, kind="mergesort")
    ps, poss = p[order], pos[order]
    # suffix[i] = positives among ps[i:], i = 0..n
    suffix_pos = np.concatenate([np.cumsum(poss[::-1])[::-1], [0]])
    if thresholds is None:
        cand = np.unique(ps)
    else:
        cand = np.asarray(thresholds, dtype=np.float64).ravel()
        cand = np.unique(cand[~np.isnan(cand)])
    idx = np.searchsorted(ps, cand, side="left")      # first score >= t
    called = len(ps) - idx
    tp = suffix_pos[idx]
    fp = called - tp
    return cand, _fbeta_counts(tp, fp, n_pos, beta), called, int(y.size)


def _pick(cand: np.ndarray, f: np.ndarray) -> int:
    """Index of the best F; among (near-)ties the highest threshold, i.e. fewest positives."""
    best = f.max()
    near = np.flatnonzero(f >= best - 1e-12 * max(best, 1.0))
    return int(near[-1])


def best_threshold(labels, predictions, beta: float = 1.0,
                   thresholds: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold that maximises binarized pF-beta ("prediction >= threshold" is positive),
    and that score.

    Exact: every distinct prediction is tried (or only `thresholds` when given), TP/FP at each
    from one sort and cumulative sums, O(n log n). Ties go to the higher threshold (fewer
    positives). With no positive label every score is 0.0: the highest candidate is returned
    with 0.0; with no candidate at all (no predictions, all NaN) (0.5, 0.0)."""
    cand, f, _, _ = _threshold_curve(labels, predictions, beta, thresholds)
    if cand.size == 0:
        return 0.5, 0.0
    i = _pick(cand, f)
    return float(cand[i]), max(float(f[i]), 0.0)


def best_quantile(labels, predictions, beta: float = 1.0) -> tuple[float, float]:
    """The top share q of predictions to flag positive ("flag the top q%") that maximises
    binarized pF-beta, and that score.

    Only shares that a cut can realise are tried (a group of tied scores is flagged whole), so
    the optimum is that of `best_threshold` and q = (# predictions >= that threshold) / n, n
    counting every prediction. `cut.binarize(values, "quantile:q")` (np.quantile(values,
    1 - q), >= cut) flags exactly those k = q n on the same values. Ties go to the smaller q.
    (0.0, 0.0) when there is nothing to flag."""
    cand, f, called, n = _threshold_curve(labels, predictions, beta)
    if cand.size == 0 or n == 0:
        return 0.0, 0.0
    i = _pick(cand, f)
    return float(called[i]) / n, max(float(f[i]), 0.0)


def roc_auc(labels, predictions) -> float:
    """ROC AUC; NaN when only one class is present (nothing to rank)."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, predictions))


def pr_auc(labels, predictions) -> float:
    """Average precision (area under the precision-recall curve)."""
    from sklearn.metrics import average_precision_score
    y = np.asarray(labels)
    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, predictions))


def breast_level(df: pd.DataFrame, pred_col: str = "prediction", label_col: str = "cancer",
                 agg: str = "mean") -> pd.DataFrame:
    """One row per prediction_id (patient_id + laterality where the column is absent): the
    views' predictions aggregated (mean or max; views without a prediction, NaN, are skipped:
    a breast none of whose views was read stays NaN), the label the maximum of the views'
    labels (both views of a positive breast are positive). The one views -> breast rule:
    training's validation, out-of-fold tuning, the submission and the exam reports use it."""
    if agg not in ("mean", "max"):
        raise ValueError(f"aggregation {agg!r}: choose mean or max")
    d = with_prediction_id(df.copy())
    cols = {pred_col: agg}
    if label_col in d:
        cols[label_col] = "max"
    return d.groupby("prediction_id", sort=False).agg(cols).reset_index()


def evaluate(df: pd.DataFrame, pred_col: str = "prediction", label_col: str = "cancer",
             beta: float = 1.0) -> dict:
    """All metrics at image level and at breast level (mean and max): one flat dict."""
    out: dict = {}
    levels = {"image": df[[label_col, pred_col]]}
    for agg in ("mean", "max"):
        levels[f"breast_{agg}"] = breast_level(df, pred_col, label_col, agg)
    for name, d in levels.items():
        y, p = d[label_col].to_numpy(), d[pred_col].to_numpy()
        t, f = best_threshold(y, p, beta)
        out.update({f"{name}_pf1": pfbeta(y, p, beta), f"{name}_auc": roc_auc(y, p),
                    f"{name}_pr_auc": pr_auc(y, p), f"{name}_best_threshold": t,
                    f"{name}_best_f1": f, f"{name}_n": int(len(d)),
                    f"{name}_positives": int(np.sum(y))})
    out["image_log_loss"] = log_loss(*levels["image"].to_numpy().T)
    return out


def log_loss(labels, predictions, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps]), unweighted: the
    validation counterpart of the training loss (which weighs positives by pos_weight and sees
    them upsampled, so the two match only with pos_weight 1 and no upsampling)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(predictions, dtype=np.float64).ravel(), eps, 1 - eps)
    if not y.size:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


# ----------------------------------------------------------------------------------------
# Calibration: is a predicted 0.1 right one time in ten?
# ----------------------------------------------------------------------------------------

def brier_score(labels, predictions) -> float:
    """Mean squared error of the probabilities, mean((p - y)^2); lower is better."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def calibration_bin(predictions, n_bins: int = 10) -> np.ndarray:
    """Bin index 0..n_bins-1 of each probability: equal-width bins [k/n, (k+1)/n), the last
    one closed at 1.0 (values are clipped to [0, 1] first)."""
    p = np.clip(np.asarray(predictions, dtype=np.float64).ravel(), 0.0, 1.0)
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def reliability_table(labels, predictions, n_bins: int = 10) -> pd.DataFrame:
    """The reliability diagram as a table: per equal-width bin its range, count, mean
    prediction and observed share of positives (NaN in empty bins)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    b = calibration_bin(p, n_bins)
    n = np.bincount(b, minlength=n_bins)
    sp = np.bincount(b, weights=np.clip(p, 0, 1), minlength=n_bins)
    sy = np.bincount(b, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"bin": np.arange(n_bins), "lo": np.arange(n_bins) / n_bins,
                             "hi": np.arange(1, n_bins + 1) / n_bins, "n": n,
                             "mean_prediction": np.where(n > 0, sp / np.maximum(n, 1), np.nan),
                             "observed_rate": np.where(n > 0, sy / np.maximum(n, 1), np.nan)})


def expected_calibration_error(labels, predictions, n_bins: int = 10) -> float:
    """ECE: sum over equal-width bins of (bin share) * |mean prediction - share positive|."""
    t = reliability_table(labels, predictions, n_bins)
    used = t["n"] > 0
    if not used.any():
        return float("nan")
    w = t.loc[used, "n"] / t.loc[used, "n"].sum()
    return float((w * (t.loc[used, "mean_prediction"] - t.loc[used, "observed_rate"]).abs()).sum())
