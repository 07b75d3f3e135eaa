"""Calibration: map the ensemble's breast-level score to the rate of cancer it predicts.

Training reweights the classes (positives repeated to 10% of each epoch, a positive weight in
the BCE), so a model's "probability" is the cancer rate of the training mix, not of screening:
odds inflated about 5x for the default recipe, 25x with pos_weight 5 on top. Ranking (AUC) and
the binarised submission do not care; anyone reading the number as a risk does.

A calibrator is fitted on out-of-fold predictions aggregated per breast exactly as the
submission aggregates them (a calibrator of image scores would be wrong for breast means), and
stored as plain JSON numbers inside ensemble.json, so that file alone carries it to Kaggle.
Every method is monotone non-decreasing, so the ranking, and the breasts flagged by a threshold
applied to the raw score, are unchanged: the binary output keeps the raw threshold.

Methods (`method=`):
* "platt" (the default): sigmoid(a * logit(p) + b), logistic regression on the logit
  (scikit-learn, unpenalised). Temperature scaling with a bias; the bias is what removes the
  prior shift of reweighted training (log 25 for odds inflated 25x), which a temperature alone
  cannot; two numbers, stable with a few hundred positive breasts.
* "temperature": sigmoid(logit(p) / T), one number; only rescales confidence around 0.5.
* "isotonic": a non-decreasing step function (scikit-learn IsotonicRegression), linear between
  its knots; the most flexible, but it ties scores within each step (hurting the AUC of the
  calibrated scores a little) and over-fits when positives are few.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import patient_of, with_prediction_id
from rsna_utils.learn import metrics

METHODS = ("platt", "temperature", "isotonic")
DEFAULT_METHOD = "platt"
EPS = 1e-6                  # probabilities clipped to [EPS, 1 - EPS] before the logit


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(z) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _check_xy(labels, predictions, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise RsnaError(f"{what}: {y.size} labels but {p.size} predictions")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise RsnaError(f"{what}: predictions must be probabilities in [0, 1] without NaN; "
                        "pass the ensemble's mean probability per breast")
    if not np.isin(y, (0, 1)).all():
        raise RsnaError(f"{what}: labels must be 0/1 (the cancer column)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise RsnaError(f"{what}: {n_pos} positive(s) among {y.size}; a calibrator needs both "
                        "cancers and normals: fit it on the out-of-fold predictions of all folds")
    return y, p


def fit_calibrator(labels, predictions, method: str = DEFAULT_METHOD) -> dict:
    """Fit `method` on (labels, probabilities); a JSON-ready dict that `apply_calibrator`
    reads: method, its numbers, n, n_positives, and Brier / ECE before and after on the data
    it was fitted to (in-sample: optimistic for isotonic)."""
    if method not in METHODS:
        raise RsnaError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    y, p = _check_xy(labels, predictions, f"{method} calibration")
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(p, y)
        cal = {"method": method, "x": [float(v) for v in iso.X_thresholds_],
               "y": [float(v) for v in iso.y_thresholds_]}
    else:
        from sklearn.linear_model import LogisticRegression
        z = logit(p)[:, None]
        lr = LogisticRegression(C=np.inf, fit_intercept=method == "platt", max_iter=1000).fit(z, y)
        a = float(lr.coef_[0, 0])
        b = float(lr.intercept_[0]) if method == "platt" else 0.0
        if not a > 0:
            raise RsnaError(f"{method} calibration: the fitted slope on the logit is {a:.3g} "
                            "(scores do not rise with cancer); check that the predictions and "
                            "labels belong together")
        cal = ({"method": method, "a": a, "b": b} if method == "platt"
               else {"method": method, "temperature": 1 / a})
    q = apply_calibrator(cal, p)
    cal.update(n=int(y.size), n_positives=int(y.sum()),
               brier_before=metrics.brier_score(y, p), brier_after=metrics.brier_score(y, q),
               ece_before=metrics.expected_calibration_error(y, p),
               ece_after=metrics.expected_calibration_error(y, q))
    return cal


def apply_calibrator(calibrator: dict, predictions) -> np.ndarray:
    """Calibrated probabilities: the stored map applied to probabilities."""
    c = check_calibrator(calibrator)
    p = np.asarray(predictions, dtype=np.float64)
    if c["method"] == "platt":
        return _sigmoid(c["a"] * logit(p) + c["b"])
    if c["method"] == "temperature":
        return _sigmoid(logit(p) / c["temperature"])
    return np.interp(p, c["x"], c["y"])       # = IsotonicRegression.predict, clipped at the ends


def check_calibrator(calibrator, where: str = "calibrator") -> dict:
    """The calibrator dict if it is one `apply_calibrator` can use; RsnaError saying what is
    wrong otherwise (e.g. an ensemble.json edited by hand)."""
    fix = "refit it with `rsna oof --calibration platt` (or oof.write_ensemble)"
    if not isinstance(calibrator, dict) or calibrator.get("method") not in METHODS:
        m = calibrator.get("method") if isinstance(calibrator, dict) else type(calibrator).__name__
        raise RsnaError(f"{where}: method {m!r} is not one of {', '.join(METHODS)}; {fix}")
    need = {"platt": ("a", "b"), "temperature": ("temperature",), "isotonic": ("x", "y")}
    m = calibrator["method"]
    for k in need[m]:
        v = calibrator.get(k)
        vals = v if m == "isotonic" else [v]
        if not isinstance(vals, list) or not vals or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
                for x in vals):
            raise RsnaError(f"{where}: {m} needs {k} as finite number(s), found {v!r}; {fix}")
    if m == "temperature" and calibrator["temperature"] <= 0:
        raise RsnaError(f"{where}: temperature {calibrator['temperature']} must be > 0; {fix}")
    if m == "isotonic" and (len(calibrator["x"]) != len(calibrator["y"])
                            or np.any(np.diff(calibrator["x"]) < 0)):
        raise RsnaError(f"{where}: isotonic x and y must be equally long, x ascending; {fix}")
    return calibrator


def cross_fit(labels, predictions, folds, method: str = DEFAULT_METHOD) -> np.ndarray:
    """Held-out calibrated predictions: each fold's by a calibrator fitted on the other folds,
    the honest way to measure what calibration does to data it has not seen."""
    y, p = _check_xy(labels, predictions, f"{method} cross-fitting")
    folds = np.asarray(folds)
    if len(folds) != len(y):
        raise RsnaError(f"cross-fitting: {len(folds)} fold labels for {len(y)} predictions")
    ks = pd.unique(folds)
    if len(ks) < 2:
        raise RsnaError("cross-fitting needs at least 2 folds; pass the OOF fold of each breast")
    out = np.empty_like(p)
    for k in ks:
        held = folds == k
        out[held] = apply_calibrator(fit_calibrator(y[~held], p[~held], method), p[held])
    return out


def _breast_folds(oof_df: pd.DataFrame, breast: pd.DataFrame, n_folds: int) -> np.ndarray:
    """Each breast's validation fold: `fold`, else the first model's `fold_<model>` (what
    oof.merge_oof writes); else patients split into `n_folds` groups by patient_id."""
    cols = ["fold"] if "fold" in oof_df else sorted(c for c in oof_df if c.startswith("fold_"))
    if cols and oof_df[cols[0]].notna().all():
        f = oof_df.groupby("prediction_id", sort=False)[cols[0]].first()
        return f.loc[breast["prediction_id"]].to_numpy()
    pid = patient_of(breast["prediction_id"])
    return pd.util.hash_array(pid.to_numpy(dtype=object)) % n_folds


def calibrate_oof(oof_df: pd.DataFrame, agg: str = "mean", method: str = DEFAULT_METHOD,
                  n_folds: int = 5) -> dict:
    """A calibrator for the submission: fitted on the OOF predictions (`oof.merge_oof`, or an
    oof_predictions.csv / val_predictions.csv table) aggregated per breast with `agg`, plus
    "agg" and "cross_fitted": Brier / ECE of the raw and the cross-fitted calibrated breast
    predictions over the OOF folds (a calibrator per fold fitted on the others)."""
    if agg not in ("mean", "max"):
        raise RsnaError(f"agg {agg!r}: choose mean or max (the submission's aggregation)")
    missing = [c for c in ("cancer", "prediction") if c not in oof_df]
    if missing:
        raise RsnaError(f"OOF table lacks {missing}; pass the output of oof.merge_oof")
    breast = metrics.breast_level(oof_df, "prediction", "cancer", agg)
    y, p = breast["cancer"].to_numpy(), breast["prediction"].to_numpy(dtype=np.float64)
    cal = fit_calibrator(y, p, method)
    cal["agg"] = agg
    oof_df = with_prediction_id(oof_df)
    folds = _breast_folds(oof_df, breast, n_folds)
    try:
        q = cross_fit(y, p, folds, method)
        cal["cross_fitted"] = {"folds": int(len(pd.unique(folds))),
                               "brier_before": metrics.brier_score(y, p),
                               "brier_after": metrics.brier_score(y, q),
                               "ece_before": metrics.expected_calibration_error(y, p),
                               "ece_after": metrics.expected_calibration_error(y, q)}
    except RsnaError as e:         # a fold without cancers among the others: report, not fail
        cal["cross_fitted"] = {"error": str(e)}
    return cal
