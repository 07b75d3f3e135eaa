"""The competition metric (probabilistic F-beta) and the usual classification metrics, at image
level and at breast level (`prediction_id` = f"{patient_id}_{laterality}")."""
from __future__ import annotations

import numpy as np
import pandas as pd


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


def best_threshold(labels, predictions, beta: float = 1.0,
                   thresholds: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold that maximises binarized pF-beta, and that score."""
    p = np.asarray(predictions, dtype=np.float64)
    if thresholds is None:
        thresholds = np.unique(np.concatenate([np.quantile(p, np.linspace(0, 1, 201)), [0.5]]))
    best_t, best = 0.5, -1.0
    for t in thresholds:
        s = fbeta_at(labels, p, float(t), beta)
        if s > best:
            best_t, best = float(t), s
    return best_t, max(best, 0.0)


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
    """One row per prediction_id: the views' predictions aggregated (mean or max), the label
    the maximum of the views' labels (both views of a positive breast are positive)."""
    if agg not in ("mean", "max"):
        raise ValueError(f"agg {agg!r}: choose mean or max")
    d = df.copy()
    if "prediction_id" not in d:
        d["prediction_id"] = d["patient_id"].astype(str) + "_" + d["laterality"].astype(str)
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
    return out
