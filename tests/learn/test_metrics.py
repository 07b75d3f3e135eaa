import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, fbeta_score, roc_auc_score

from rsna_utils.learn.metrics import (
    best_quantile,
    best_threshold,
    breast_level,
    evaluate,
    fbeta_at,
    pfbeta,
    pr_auc,
    roc_auc,
)


@pytest.mark.parametrize("labels, preds, beta, expected", [
    ([1, 0, 1, 0], [1, 0, 1, 0], 1, 1.0),
    ([1, 0, 1, 0], [0, 0, 0, 0], 1, 0.0),
    ([1, 0], [0.5, 0.5], 1, 0.5),                       # P = R = 0.5
    ([1, 0, 0], [0.8, 0.4, 0.0], 2, 5 * (2 / 3) * 0.8 / (4 * (2 / 3) + 0.8)),
    ([0, 0, 0], [0.3, 0.2, 0.1], 1, 0.0),               # no positives
    ([1, 0], [1.7, -0.4], 1, 1.0),                      # clipped to [0, 1]
])
def test_pfbeta_hand_computed(labels, preds, beta, expected):
    assert pfbeta(labels, preds, beta) == pytest.approx(expected)


def test_binarized_pfbeta_equals_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.8, 0, 1)
    for t in (0.3, 0.5, 0.7):
        b = (p >= t).astype(int)
        assert fbeta_at(y, p, t) == pytest.approx(f1_score(y, b))
        assert fbeta_at(y, p, t, beta=2) == pytest.approx(fbeta_score(y, b, beta=2))
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert pr_auc(y, p) == pytest.approx(average_precision_score(y, p))
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_best_threshold_separates():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    t, f = best_threshold(y, p)
    assert f == 1.0 and 0.3 < t <= 0.8


def test_breast_level_mean_and_max():
    df = pd.DataFrame({"patient_id": [1, 1, 1, 2, 2], "laterality": ["L", "L", "R", "L", "L"],
                       "cancer": [1, 1, 0, 0, 0], "prediction": [0.2, 0.6, 0.1, 0.3, 0.5]})
    m = breast_level(df, agg="mean").set_index("prediction_id")
    assert m.loc["1_L", "prediction"] == pytest.approx(0.4) and m.loc["1_L", "cancer"] == 1
    assert m.loc["2_L", "prediction"] == pytest.approx(0.4)
    x = breast_level(df, agg="max").set_index("prediction_id")
    assert x.loc["1_L", "prediction"] == 0.6 and len(x) == 3
    e = evaluate(df)
    assert e["breast_mean_n"] == 3 and e["image_n"] == 5 and e["breast_max_positives"] == 1
    assert e["breast_max_auc"] == pytest.approx(1.0)
    from sklearn.metrics import log_loss as sk_log_loss
    assert e["image_log_loss"] == pytest.approx(sk_log_loss(df.cancer, df.prediction))


def test_log_loss_is_sklearns_and_clips():
    from sklearn.metrics import log_loss as sk_log_loss

    from rsna_utils.learn.metrics import log_loss
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.random(50)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p))
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))          # clipped, not inf
    assert log_loss([1, 0], [0.0, 1.0]) == pytest.approx(-np.log(1e-7))
    assert np.isnan(log_loss([], []))


# ---- exact threshold / quantile search -------------------------------------------------------

def _brute(y, p, beta=1.0, thresholds=None):
    """Every candidate through fbeta_at: the best score, and the highest threshold reaching it."""
    cand = np.unique(p[~np.isnan(p)]) if thresholds is None else np.unique(thresholds)
    scores = np.array([fbeta_at(y, p, float(t), beta) for t in cand])
    best = scores.max()
    return float(cand[np.flatnonzero(np.isclose(scores, best, rtol=1e-12, atol=1e-15))[-1]]), best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_best_threshold_equals_brute_force(seed, beta):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < rng.uniform(0.03, 0.4)).astype(int)
    p = np.clip(y * rng.uniform(0, 0.5) + rng.random(n) * 0.7, 0, 1)
    if seed % 2:
        p = np.round(p, 1)                     # many ties
    t, f = best_threshold(y, p, beta)
    bt, bf = _brute(y, p, beta)
    assert f == pytest.approx(bf, rel=1e-12, abs=1e-15)
    assert fbeta_at(y, p, t, beta) == pytest.approx(f, rel=1e-12)
    assert t == bt                             # ties: the highest threshold (fewest positives)
    assert isinstance(t, float) and isinstance(f, float)


def test_best_threshold_given_thresholds_only():
    rng = np.random.default_rng(11)
    y = (rng.random(200) < 0.2).astype(int)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    grid = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.5, np.nan])      # unsorted, repeated, NaN
    t, f = best_threshold(y, p, thresholds=grid)
    bt, bf = _brute(y, p, thresholds=grid[~np.isnan(grid)])
    assert t in (0.1, 0.3, 0.5, 0.7, 0.9) and t == bt and f == pytest.approx(bf)
    assert f <= best_threshold(y, p)[1] + 1e-12


def test_best_threshold_edge_cases():
    t, f = best_threshold([0, 0, 0, 0], [0.1, 0.4, 0.4, 0.9])          # no positive label
    assert f == 0.0 and np.isfinite(t)
    assert best_threshold([], []) == (0.5, 0.0)
    assert best_threshold([1, 0], [np.nan, np.nan]) == (0.5, 0.0)
    assert best_threshold([1, 1, 0], [0.5, 0.5, 0.5]) == (0.5, pytest.approx(0.8))   # one tie group
    # a NaN score is never positive, but its cancer still counts as missed
    t, f = best_threshold([1, 1, 0], [0.9, np.nan, 0.1])
    assert t == 0.9 and f == pytest.approx(fbeta_at([1, 1, 0], [0.9, np.nan, 0.1], 0.9))
    # equal scores prefer the higher threshold: >= 0.9 (1 TP) and >= 0.6 (2 TP, 2 FP) both give 2/3
    t, f = best_threshold([1, 0, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.1])
    assert (t, f) == (0.9, pytest.approx(2 / 3))
    with pytest.raises(ValueError):
        best_threshold([1, 0], [0.5])


def test_best_threshold_large_input_is_fast():
    import time
    rng = np.random.default_rng(0)
    y = (rng.random(300_000) < 0.02).astype(int)
    p = rng.random(300_000)
    t0 = time.perf_counter()
    best_threshold(y, p)
    assert time.perf_counter() - t0 < 5      # one sort for all 300k candidates, not a pass each


@pytest.mark.parametrize("seed", range(4))
def test_best_quantile_top_share(seed):
    from rsna_utils.infer.predict import binarize
    rng = np.random.default_rng(100 + seed)
    n = 150
    y = (rng.random(n) < 0.15).astype(int)
    p = np.clip(y * 0.35 + rng.random(n) * 0.7, 0, 1)
    if seed % 2:
        p = np.round(p, 2)
    q, f = best_quantile(y, p)
    t, ft = best_threshold(y, p)
    assert f == pytest.approx(ft) and q == pytest.approx((p >= t).sum() / n)
    # brute force over every achievable top-k (tie groups flagged whole)
    order = np.sort(np.unique(p))[::-1]
    best = max(fbeta_at(y, (p >= c).astype(float), 0.5) for c in order)
    assert f == pytest.approx(best)
    # predict.py's "quantile:q" flags exactly the same breasts
    flags = binarize(p, f"quantile:{q!r}", 0.5)
    assert np.array_equal(flags, (p >= t).astype(float)) and fbeta_at(y, flags, 0.5) == pytest.approx(f)


def test_best_quantile_edge_cases():
    assert best_quantile([], []) == (0.0, 0.0)
    q, f = best_quantile([0, 0, 0], [0.1, 0.2, 0.3])
    assert f == 0.0 and 0 < q <= 1
    q, f = best_quantile([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (q, f) == (0.5, 1.0)
