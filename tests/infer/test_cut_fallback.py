"""The cut fallback (issue 37, item 5): a submission binarised at the ensemble's threshold says
what share of the breasts it flags, holds it against the out-of-fold range, and outside it
flags the out-of-fold positive rate instead (the 1st place's quantile mode beside its
threshold)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from rsna_utils.infer import predict as predict_mod
from rsna_utils.infer import scoring
from rsna_utils.infer.ensemble import Ensemble
from rsna_utils.infer.predict import (FALLBACK_FACTOR, FALLBACK_MIN_EXPECTED, PredictConfig,
                                      binarize, binary_cut, predict)

RATE = 0.02          # the ensemble's out-of-fold positive rate in these tests
N = 1000             # breasts: n x rate = 20 expected flagged, enough to judge


def _inside_scores(n=N, above=20):
    """`above` of `n` breasts at or over 0.5, all distinct."""
    v = np.linspace(0.0, 0.45, n)
    v[-above:] = np.linspace(0.6, 0.9, above)
    return v


def test_inside_the_range_nothing_changes():
    v = _inside_scores(above=30)                       # 3.0%: inside 0.67%-6.00%
    out, rec = binary_cut(v, "threshold", 0.5, oof_rate=RATE)
    np.testing.assert_array_equal(out, binarize(v, "threshold", 0.5))
    assert (rec["flagged"], rec["submitted_flagged"], rec["fell_back"], rec["judged"]) == \
        (30, 30, False, True)
    assert rec["share"] == pytest.approx(0.03)
    assert rec["range"] == pytest.approx([RATE / FALLBACK_FACTOR, RATE * FALLBACK_FACTOR])
    assert "30 of 1,000 breasts (3.00%) flagged at threshold 0.5000" in rec["line"]
    assert "inside the out-of-fold range 0.67%-6.00%" in rec["line"]
    assert rec["line"].endswith("kept the threshold")


@pytest.mark.parametrize("scores, flagged_at_threshold", [
    (np.linspace(0.6, 0.99, N), N),       # every score above the threshold: 100% flagged
    (np.linspace(0.0, 0.4, N), 0),        # every score below it: nothing flagged
])
def test_outside_the_range_the_quantile_share_is_flagged(scores, flagged_at_threshold):
    out, rec = binary_cut(scores, "threshold", 0.5, oof_rate=RATE)
    assert rec["flagged"] == flagged_at_threshold
    assert rec["fell_back"] and rec["judged"]
    assert int(out.sum()) == rec["submitted_flagged"] == round(RATE * N)     # the top 2%
    assert set(np.flatnonzero(out)) == set(np.argsort(scores)[-round(RATE * N):])
    line = rec["line"]
    assert line.startswith("cut fallback: threshold 0.5000 flagged "
                           f"{flagged_at_threshold:,} of 1,000 breasts "
                           f"({flagged_at_threshold / N:.2%})")
    assert "outside the out-of-fold range 0.67%-6.00%" in line
    assert "flagged the top 2.00% instead (the quantile cut: 20 breasts, 2.00%)" in line


def test_the_fallback_can_be_turned_off():
    v = np.linspace(0.6, 0.99, N)
    out, rec = binary_cut(v, "threshold", 0.5, oof_rate=RATE, fallback=False)
    assert out.sum() == N and not rec["fell_back"] and rec["judged"]
    assert "OUTSIDE the out-of-fold range" in rec["line"] and "cut_fallback is off" in rec["line"]


def test_too_few_breasts_are_not_judged():
    n = int(FALLBACK_MIN_EXPECTED / RATE) - 1            # 499 breasts: 9.98 expected flagged
    v = np.linspace(0.6, 0.99, n)
    out, rec = binary_cut(v, "threshold", 0.5, oof_rate=RATE)
    assert out.sum() == n and not rec["judged"] and not rec["fell_back"]
    assert "too few breasts" in rec["line"] and rec["line"].endswith("kept the threshold")


def test_a_plain_threshold_or_quantile_reports_its_share_only():
    v = np.linspace(0.6, 0.99, N)
    out, rec = binary_cut(v, "threshold", 0.5)          # no out-of-fold rate: as before
    np.testing.assert_array_equal(out, binarize(v, "threshold", 0.5))
    assert rec["range"] is None and not rec["fell_back"]
    assert rec["line"] == ("binary output: 1,000 of 1,000 breasts (100.00%) flagged at "
                           "threshold 0.5000")
    out, rec = binary_cut(v, "quantile:0.05", 0.5, oof_rate=RATE)   # the rate plays no part
    assert out.sum() == 50 and rec["range"] is None
    assert "flagged at the top 5.00% (quantile:0.05)" in rec["line"]


def test_the_ensemble_passes_its_rate_only_for_its_own_threshold():
    ens = Ensemble({"threshold": 0.5, "quantile": RATE, "binarize": "threshold", "agg": "mean",
                    "tta": False})
    assert ens.predict_settings({})["oof_rate"] == RATE
    assert "flagged 2.00% of the breasts" in ens.cut_line()
    assert "oof_rate" not in ens.predict_settings({"threshold": 0.3})        # the user's own cut
    assert "oof_rate" not in ens.predict_settings({"binarize_how": "quantile:0.05"})
    assert "oof_rate" not in ens.predict_settings({"output": "probability"})
    # an older file with a threshold and no rate: the threshold alone
    old = Ensemble({"threshold": 0.5, "binarize": "threshold", "agg": "mean", "tta": False})
    assert "oof_rate" not in old.predict_settings({}) and old.oof_rate is None
    assert Ensemble({"threshold": 0.5, "quantile": 0.0}).oof_rate is None
    cfg = PredictConfig("i", "c.csv", ["x.pt"], **ens.predict_settings({}))
    assert (cfg.oof_rate, cfg.cut_fallback, cfg.binarize_how) == (RATE, True, "threshold")


def test_the_cli_flag_turns_it_off(tmp_path, monkeypatch):
    import rsna_utils.infer.predict
    from rsna_utils.app.cli import main

    class Result:
        images, submission, seconds, metrics = [1], [1], 1.0, {}

        def counts(self):
            return ""
    seen = {}
    monkeypatch.setattr(rsna_utils.infer.predict, "predict",
                        lambda cfg: seen.setdefault("cfg", cfg) and Result())
    ens = tmp_path / "ensemble.json"
    ens.write_text('{"threshold": 0.25, "quantile": 0.02, "agg": "mean", "binarize": "threshold"}')
    base = ["predict", "--images", "i", "--csv", "c", "--checkpoints", "b.pt", "--ensemble",
            str(ens), "--quiet"]
    assert main(base) == 0
    assert (seen["cfg"].oof_rate, seen["cfg"].cut_fallback) == (0.02, True)
    seen.clear()
    assert main(base + ["--no-cut-fallback"]) == 0
    assert (seen["cfg"].oof_rate, seen["cfg"].cut_fallback) == (0.02, False)


# -- through predict(), the models replaced by fixed scores ------------------------------------

@pytest.fixture
def fixed_scores(tmp_path, monkeypatch):
    """A test set of N breasts (one view each) whose ensemble scores are `scores[...]`."""
    images = tmp_path / "test_images"
    images.mkdir()
    df = pd.DataFrame({"patient_id": np.arange(N) // 2 + 1, "image_id": np.arange(N) + 100,
                       "laterality": np.where(np.arange(N) % 2, "R", "L")})
    df.to_csv(tmp_path / "test.csv", index=False)
    scores = {"v": np.linspace(0.6, 0.99, N)}          # all above the threshold 0.5
    model = SimpleNamespace(recipe="r", recipe_weight=None, threshold=0.5, prior=0.02, path="m.pt")
    monkeypatch.setattr(scoring, "load_models", lambda paths, dev: ([model], {}))

    def score_images(cfg, df, ens):
        imgs = df[["patient_id", "image_id", "laterality", "prediction_id"]].copy()
        imgs["prediction"] = scores["v"][:len(imgs)]
        imgs["problem"], imgs["looks_inverted"] = "", False
        return imgs
    monkeypatch.setattr(predict_mod, "score_images", score_images)
    return SimpleNamespace(images=images, csv=tmp_path / "test.csv", out=tmp_path / "s.csv",
                           scores=scores)


def test_predict_with_the_ensemble_falls_back_and_says_so(fixed_scores, capsys):
    ens = Ensemble({"threshold": 0.5, "quantile": RATE, "binarize": "threshold", "agg": "mean",
                    "tta": False})
    cfg = PredictConfig(str(fixed_scores.images), str(fixed_scores.csv), ["m.pt"],
                        out=str(fixed_scores.out), device="cpu", progress=False,
                        **ens.predict_settings({}))
    res = predict(cfg)
    printed = capsys.readouterr().out
    assert res.submission["cancer"].sum() == round(RATE * N)          # the quantile share
    assert pd.read_csv(fixed_scores.out)["cancer"].sum() == round(RATE * N)
    assert res.cut["fell_back"] and res.cut["share"] == 1.0
    assert res.cut["submitted_share"] == pytest.approx(RATE)
    assert res.cut["line"] in printed and printed.count("cut fallback:") == 1
    assert "1,000 of 1,000 breasts (100.00%)" in printed and "the top 2.00% instead" in printed


def test_predict_inside_the_range_keeps_the_threshold(fixed_scores, capsys):
    fixed_scores.scores["v"] = _inside_scores(above=30)
    ens = Ensemble({"threshold": 0.5, "quantile": RATE, "binarize": "threshold", "agg": "mean",
                    "tta": False})
    res = predict(PredictConfig(str(fixed_scores.images), str(fixed_scores.csv), ["m.pt"], out=None,
                                device="cpu", progress=False, **ens.predict_settings({})))
    assert res.submission["cancer"].sum() == 30 and not res.cut["fell_back"]
    assert "30 of 1,000 breasts (3.00%) flagged" in capsys.readouterr().out


def test_predict_with_a_plain_threshold_behaves_as_before(fixed_scores, capsys):
    res = predict(PredictConfig(str(fixed_scores.images), str(fixed_scores.csv), ["m.pt"],
                                out=None, device="cpu", progress=False, binarize_how="threshold"))
    assert res.submission["cancer"].sum() == N                 # every breast over 0.5
    assert res.cut["range"] is None and not res.cut["fell_back"]
    printed = capsys.readouterr().out
    assert "1,000 of 1,000 breasts (100.00%) flagged at threshold 0.5000" in printed
    assert "cut fallback" not in printed
    # probabilities: no cut, nothing to say
    res = predict(PredictConfig(str(fixed_scores.images), str(fixed_scores.csv), ["m.pt"],
                                out=None, device="cpu", progress=False))
    assert res.cut == {} and res.submission["cancer"].min() == pytest.approx(0.6)
