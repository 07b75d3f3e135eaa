import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, fbeta_score, roc_auc_score

from rsna_utils.metrics import (best_threshold, breast_level, evaluate, fbeta_at, pfbeta, pr_auc,
                                roc_auc)


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
