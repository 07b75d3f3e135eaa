import json

import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer import calibrate as cal
from rsna_utils.learn.metrics import brier_score, expected_calibration_error, roc_auc


def _inflated(n: int = 6000, seed: int = 0, inflate: float = 25.0):
    """True cancer risk q (about 3%), labels drawn from it, and the score a model trained with
    reweighted classes reports: the odds of q times `inflate` (weighted BCE + upsampling)."""
    rng = np.random.default_rng(seed)
    q = 1 / (1 + np.exp(-rng.normal(-4.2, 1.3, n)))
    y = (rng.random(n) < q).astype(int)
    odds = inflate * q / (1 - q)
    return y, odds / (1 + odds)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_lowers_held_out_ece_over_oof_folds(method):
    y, p = _inflated()
    folds = np.arange(len(y)) % 5
    q = cal.cross_fit(y, p, folds, method)
    before, after = expected_calibration_error(y, p), expected_calibration_error(y, q)
    assert before > 0.2                               # the inflated score is far off
    assert after < before / 10 and after < 0.02
    assert brier_score(y, q) < brier_score(y, p) / 3
    # each fold was calibrated without its own labels: refitting with them gives other numbers
    inside = cal.apply_calibrator(cal.fit_calibrator(y, p, method), p)
    assert not np.allclose(inside[folds == 0], q[folds == 0])


def test_platt_recovers_the_odds_factor_and_temperature_cannot():
    y, p = _inflated(20000, seed=1)
    c = cal.fit_calibrator(y, p, "platt")
    assert c["b"] == pytest.approx(-np.log(25), abs=0.35) and c["a"] == pytest.approx(1, abs=0.1)
    t = cal.fit_calibrator(y, p, "temperature")
    assert t["ece_after"] > 0.5 * t["ece_before"]     # a scale alone cannot remove a shift


def test_maps_equal_scikit_learn_and_keep_the_order():
    y, p = _inflated(3000, seed=2)
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    c = cal.fit_calibrator(y, p, "isotonic")
    grid = np.r_[0.0, np.sort(np.random.default_rng(0).random(500)), 1.0]
    np.testing.assert_allclose(cal.apply_calibrator(c, grid), iso.predict(grid), atol=1e-12)
    lr = LogisticRegression(C=np.inf).fit(cal.logit(p)[:, None], y)
    c = cal.fit_calibrator(y, p, "platt")
    np.testing.assert_allclose(cal.apply_calibrator(c, grid),
                               lr.predict_proba(cal.logit(grid)[:, None])[:, 1], rtol=1e-9)
    for m in cal.METHODS:   # monotone: a threshold on the raw score flags the same breasts
        out = cal.apply_calibrator(cal.fit_calibrator(y, p, m), grid)
        assert (np.diff(out) >= -1e-15).all(), m


@pytest.mark.parametrize("method", cal.METHODS)
def test_calibrator_is_plain_json(method):
    y, p = _inflated(2000, seed=3)
    c = cal.fit_calibrator(y, p, method)
    back = json.loads(json.dumps(c))
    np.testing.assert_array_equal(cal.apply_calibrator(back, p), cal.apply_calibrator(c, p))


def test_bad_calibrators_and_data_are_refused():
    with pytest.raises(RsnaError, match="method 'spline' is not one of"):
        cal.apply_calibrator({"method": "spline"}, [0.1])
    with pytest.raises(RsnaError, match="platt needs b as finite"):
        cal.apply_calibrator({"method": "platt", "a": 1.0, "b": None}, [0.1])
    with pytest.raises(RsnaError, match="temperature -1 must be > 0"):
        cal.apply_calibrator({"method": "temperature", "temperature": -1}, [0.1])
    with pytest.raises(RsnaError, match="x ascending"):
        cal.apply_calibrator({"method": "isotonic", "x": [0.5, 0.1], "y": [0, 1]}, [0.1])
    with pytest.raises(RsnaError, match="0 positive.*both"):
        cal.fit_calibrator([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(RsnaError, match="in \\[0, 1\\]"):
        cal.fit_calibrator([0, 1], [0.1, np.nan])
    with pytest.raises(RsnaError, match="choose one of platt"):
        cal.fit_calibrator([0, 1], [0.1, 0.9], "beta")
    with pytest.raises(RsnaError, match="slope on the logit"):   # scores fall with cancer
        cal.fit_calibrator([1, 1, 1, 0, 0, 0, 1, 0], [0.1, 0.2, 0.15, 0.8, 0.9, 0.7, 0.3, 0.6])


def test_calibrate_oof_fits_on_breasts_with_the_oof_folds():
    y, p = _inflated(4000, seed=4)
    n = len(y)
    # one row per view: two views per breast; the breast mean is the inflated score
    spread = np.random.default_rng(5).uniform(-0.05, 0.05, n)
    df = pd.DataFrame({"patient_id": np.repeat(np.arange(n) // 2, 2),
                       "laterality": np.repeat(np.where(np.arange(n) % 2, "R", "L"), 2),
                       "cancer": np.repeat(y, 2),
                       "prediction": np.c_[np.clip(p - spread, 0, 1), np.clip(p + spread, 0, 1)].ravel(),
                       "fold_m": np.repeat((np.arange(n) // 2) % 4, 2)})
    c = cal.calibrate_oof(df, agg="mean", method="platt")
    assert c["n"] == n and c["agg"] == "mean" and c["cross_fitted"]["folds"] == 4
    x = c["cross_fitted"]
    assert x["ece_after"] < x["ece_before"] / 10
    # fitted on the breast means, not the views
    b = df.groupby(["patient_id", "laterality"], sort=False).prediction.mean().to_numpy()
    assert c == {**c, **{k: v for k, v in cal.fit_calibrator(y, b, "platt").items()}}
    assert cal.calibrate_oof(df, agg="max")["agg"] == "max"
    # without fold columns: patients in 5 groups
    assert cal.calibrate_oof(df.drop(columns="fold_m"))["cross_fitted"]["folds"] == 5
    assert roc_auc(y, cal.apply_calibrator(c, b)) == pytest.approx(roc_auc(y, b))
