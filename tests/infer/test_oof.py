import json
import shutil

import numpy as np
import pandas as pd
import pytest

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.oof import ensemble_threshold, merge_oof, write_ensemble
from rsna_utils.learn.metrics import best_threshold, breast_level, fbeta_at

PATIENTS = 40


def _table(seed: int = 0) -> pd.DataFrame:
    """40 patients x 2 breasts x 2 views; patient-grouped folds 0/1; both views of a positive
    breast positive (as train.csv)."""
    rng = np.random.default_rng(seed)
    rows, image = [], 1000
    for pid in range(PATIENTS):
        for lat in "LR":
            cancer = int(rng.random() < 0.2)
            for view in ("CC", "MLO"):
                rows.append(dict(site_id=1, patient_id=10_000 + pid, image_id=image, laterality=lat,
                                 view=view, age=60.0, cancer=cancer, fold=pid % 2))
                image += 1
    df = pd.DataFrame(rows)
    df["prediction_id"] = df.patient_id.astype(str) + "_" + df.laterality
    df["png"] = "data/png/" + df.patient_id.astype(str) + "_" + df.image_id.astype(str) + ".png"
    return df


def _write_run(folder, df, config=None, drop=()):
    folder.mkdir(parents=True)
    df.drop(columns=list(drop)).to_csv(folder / "val_predictions.csv", index=False)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _config(model, fold, out, **kw):
    """The fields train.py writes (asdict(TrainConfig)), the ones that matter here."""
    d = dict(data="data/png", csv="train.csv", out=str(out), model=model, size=64, channels=3,
             epochs=2, lr=3e-4, split="kfold", folds=2, fold=fold, seed=42, workers=2,
             device="auto", resume=False, progress=True, extra={})
    d.update(kw)
    return d


@pytest.fixture
def runs(tmp_path):
    """2 models x 2 folds, as `rsna train --split kfold --fold k` writes them; returns
    (run folders, the full table with each model's prediction)."""
    table = _table()
    rng = np.random.default_rng(1)
    table["pred_a"] = np.clip(table.cancer * 0.4 + rng.random(len(table)) * 0.6, 0, 1).round(3)
    table["pred_b"] = np.clip(table.cancer * 0.2 + rng.random(len(table)) * 0.8, 0, 1).round(3)
    dirs = []
    for model, col in (("resnet18", "pred_a"), ("effnet_b2", "pred_b")):
        for fold in (0, 1):
            out = tmp_path / "runs" / model / f"fold{fold}"
            val = table[table.fold == fold].drop(columns=["pred_a", "pred_b"])
            val = val.assign(prediction=table.loc[val.index, col])
            dirs.append(_write_run(out, val, _config(model, fold, out)))
    return dirs, table


def test_merge_keeps_every_image_once_and_averages_models(runs):
    dirs, table = runs
    oof = merge_oof(dirs, weighting="equal")
    assert len(oof) == len(table) and oof.image_id.is_unique
    t = table.set_index("image_id").loc[oof.image_id]
    np.testing.assert_allclose(oof.prediction, (t.pred_a + t.pred_b) / 2)
    np.testing.assert_allclose(oof["pred_resnet18"], t.pred_a)
    np.testing.assert_allclose(oof["pred_effnet_b2"], t.pred_b)
    assert (oof["fold_resnet18"].to_numpy() == t.fold.to_numpy()).all()
    assert (oof.cancer.to_numpy() == t.cancer.to_numpy()).all()
    assert list(oof.prediction_id) == list(t.prediction_id) and (oof.n_models == 2).all()
    assert oof.attrs["models"] == ["effnet_b2", "resnet18"] and oof.attrs["dropped_images"] == 0
    assert [(r["model"], r["fold"]) for r in oof.attrs["runs"]] == [
        ("resnet18", 0), ("resnet18", 1), ("effnet_b2", 0), ("effnet_b2", 1)]


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_ensemble_threshold_is_brute_force_best_of_averaged_prediction(runs, agg):
    dirs, table = runs
    res = ensemble_threshold(merge_oof(dirs, weighting="equal"), agg=agg)
    # the submission's pipeline by hand: mean of models per image, then the breast aggregation
    ens = table.assign(prediction=(table.pred_a + table.pred_b) / 2)
    b = breast_level(ens, agg=agg)
    y, p = b.cancer.to_numpy(), b.prediction.to_numpy()
    scores = {float(t): fbeta_at(y, p, float(t)) for t in np.unique(p)}
    best = max(scores.values())
    brute_t = max(t for t, s in scores.items() if s == pytest.approx(best, rel=1e-12))
    assert res["threshold"] == brute_t and res["pf1"] == pytest.approx(best)
    assert res["n_breasts"] == 2 * PATIENTS and res["n_positives"] == int(y.sum())
    assert res["n_images"] == len(table) and len(res["runs"]) == 4 and res["binarize"] == "threshold"
    assert 0.5 < res["auc"] <= 1 and 0 < res["pr_auc"] <= 1
    assert res["quantile"] == pytest.approx((p >= brute_t).mean())
    # tuned on the ensemble, not the mean of the per-model thresholds (which predict.py uses)
    per_model = [best_threshold(*(lambda d: (d.cancer, d.prediction))(
        breast_level(table.assign(prediction=table[c]), agg=agg))) for c in ("pred_a", "pred_b")]
    assert fbeta_at(y, p, np.mean([t for t, _ in per_model])) <= res["pf1"] + 1e-12


def test_models_vote_by_their_out_of_fold_auc_above_chance(runs):
    """A model at chance must not halve a good one (issue 29): each model's vote is its
    out-of-fold breast AUC above 0.5, normalised; equal when none is above chance."""
    from rsna_utils.infer.oof import score_weights
    from rsna_utils.learn.metrics import roc_auc
    dirs, table = runs
    oof = merge_oof(dirs)                                   # weighting="auc", the default
    t = table.set_index("image_id").loc[oof.image_id]
    auc = {m: roc_auc(*(lambda b: (b.cancer, b.prediction))(breast_level(
        t.reset_index().assign(prediction=t[c].to_numpy())))) for m, c in
        (("resnet18", "pred_a"), ("effnet_b2", "pred_b"))}
    w = {m: max(a - 0.5, 0) / sum(max(x - 0.5, 0) for x in auc.values()) for m, a in auc.items()}
    assert oof.attrs["model_auc"] == pytest.approx(auc) and oof.attrs["weights"] == pytest.approx(w)
    np.testing.assert_allclose(oof.prediction, w["resnet18"] * t.pred_a + w["effnet_b2"] * t.pred_b)
    assert sorted(oof.attrs["recipe_weights"].values()) == pytest.approx(sorted(w.values()))
    assert score_weights({"a": 0.9, "b": 0.5, "c": 0.3}) == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert score_weights({"a": 0.45, "b": 0.5}) == {"a": 0.5, "b": 0.5}       # none above chance
    assert score_weights({"a": 0.8, "b": float("nan")}) == {"a": 0.5, "b": 0.5}
    with pytest.raises(RsnaError, match="weighting 'best': choose auc or equal"):
        merge_oof(dirs, weighting="best")


def test_ensemble_quantile_mode(runs):
    from rsna_utils.infer.predict import binarize
    dirs, _ = runs
    oof = merge_oof(dirs)
    rt = ensemble_threshold(oof, mode="threshold")
    rq = ensemble_threshold(oof, mode="quantile")
    assert rq["pf1"] == pytest.approx(rt["pf1"]) and rq["quantile"] == pytest.approx(rt["quantile"])
    assert rq["binarize"].startswith("quantile:") and rq["threshold"] == rt["threshold"]
    b = breast_level(oof)
    flags = binarize(b.prediction.to_numpy(), rq["binarize"], 0.5)
    assert fbeta_at(b.cancer, flags, 0.5) == pytest.approx(rq["pf1"])
    with pytest.raises(RsnaError, match="mode"):
        ensemble_threshold(oof, mode="median")


def test_write_ensemble(runs, tmp_path):
    dirs, table = runs
    res = write_ensemble(dirs, tmp_path / "ens" / "threshold.json", agg="mean")
    saved = json.loads((tmp_path / "ens" / "threshold.json").read_text())
    assert saved["threshold"] == res["threshold"] and saved["mode"] == "threshold"
    assert [r["run"] for r in saved["runs"]] == [str(d) for d in dirs]
    oof = pd.read_csv(tmp_path / "ens" / "oof_predictions.csv")
    assert len(oof) == len(table) and saved["oof_csv"].endswith("oof_predictions.csv")
    # the CSV alone gives the same cut
    assert ensemble_threshold(oof)["threshold"] == res["threshold"]


def test_write_ensemble_stores_a_breast_level_calibrator(runs, tmp_path):
    from rsna_utils.infer.calibrate import apply_calibrator, fit_calibrator
    dirs, _ = runs
    res = write_ensemble(dirs, tmp_path / "ensemble.json", agg="max", calibration="isotonic")
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    c = saved["calibrator"]
    assert c["method"] == "isotonic" and c["agg"] == "max" and c == res["calibrator"]
    assert all(isinstance(v, float) for v in c["x"] + c["y"])
    # fitted on the same max-aggregated breasts the threshold was tuned on
    b = breast_level(merge_oof(dirs, agg="max"), agg="max")   # weights by max-aggregated AUC too
    assert c["n"] == len(b) == saved["n_breasts"]
    ref = fit_calibrator(b.cancer, b.prediction, "isotonic")
    assert apply_calibrator(c, b.prediction) == pytest.approx(apply_calibrator(ref, b.prediction))
    assert c["cross_fitted"]["folds"] == 2                 # the runs' folds
    assert "calibrator" not in write_ensemble(dirs, tmp_path / "e2.json", calibration=None)
    with pytest.raises(RsnaError, match="calibration='spline': choose platt, temperature, isotonic or none"):
        write_ensemble(dirs, tmp_path / "e3.json", calibration="spline")


def test_unfittable_calibrator_keeps_the_threshold(tmp_path):
    t = _table()
    t["prediction"] = np.where(t.cancer == 1, 0.2, 0.6)     # scores fall with cancer
    t.loc[t.index[:4], "prediction"] = 0.9
    run = _write_run(tmp_path / "bad", t)
    res = write_ensemble([run], tmp_path / "ensemble.json")
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    assert saved["calibrator"] is None and "slope on the logit" in saved["calibration_error"]
    assert saved["threshold"] == res["threshold"]


def test_duplicate_image_in_two_folds_of_one_model(runs, tmp_path):
    dirs, _ = runs
    copy = tmp_path / "runs" / "resnet18" / "fold0_again"
    shutil.copytree(dirs[0], copy)
    with pytest.raises(RsnaError, match="two runs of model 'resnet18'") as e:
        merge_oof(dirs + [copy])
    assert str(dirs[0]) in str(e.value) and str(copy) in str(e.value)
    with pytest.raises(RsnaError, match="given twice"):
        merge_oof(dirs + [dirs[1]])


def test_missing_files_and_columns(runs, tmp_path):
    dirs, table = runs
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(RsnaError, match=r"not_a_run: no val_predictions.csv"):
        merge_oof(dirs + [empty])
    with pytest.raises(RsnaError, match="not found"):
        merge_oof([tmp_path / "nowhere"])
    with pytest.raises(RsnaError, match="no run folders"):
        merge_oof([])
    bad = _write_run(tmp_path / "bad", table.drop(columns=["pred_b"]).rename(
        columns={"pred_a": "prediction"}), drop=["cancer"])
    with pytest.raises(RsnaError, match=r"bad/val_predictions.csv: missing column\(s\) \['cancer'\]"):
        merge_oof([bad])
    nan = table.drop(columns=["pred_b"]).rename(columns={"pred_a": "prediction"})
    nan.loc[3, "prediction"] = np.nan
    with pytest.raises(RsnaError, match="non-numeric prediction"):
        merge_oof([_write_run(tmp_path / "nan", nan)])


def test_images_missing_from_a_model(runs):
    dirs, table = runs
    with pytest.raises(RsnaError, match=r"not scored by every model.*effnet_b2.*allow_missing"):
        merge_oof(dirs[:3])                       # effnet_b2 lacks fold 1
    oof = merge_oof(dirs[:3], allow_missing=True)
    assert set(oof.image_id) == set(table.image_id[table.fold == 0])
    assert oof.attrs["dropped_images"] == int((table.fold == 1).sum())
    assert ensemble_threshold(oof)["dropped_images"] == oof.attrs["dropped_images"]


def test_no_positives(tmp_path):
    t = _table().assign(cancer=0, prediction=0.3)
    run = _write_run(tmp_path / "neg", t)
    with pytest.raises(RsnaError, match=r"neg: no positive breast among 80"):
        ensemble_threshold(merge_oof([run]))


def test_model_and_fold_inferred_from_folders(tmp_path):
    """No config.json and no fold column: runs/<model>/fold<k> (or <model>_fold<k>) name them."""
    table = _table()
    dirs = []
    for name, layout in (("a", "{m}/fold{k}"), ("b", "{m}_fold{k}")):
        for k in (0, 1):
            val = table[table.fold == k].assign(prediction=0.5 if name == "a" else 0.7)
            dirs.append(_write_run(tmp_path / layout.format(m=name, k=k), val, drop=["fold"]))
    oof = merge_oof(dirs)
    assert oof.attrs["models"] == ["a", "b"] and len(oof) == len(table)
    assert np.allclose(oof.prediction, 0.6)
    assert [r["fold"] for r in oof.attrs["runs"]] == [0, 1, 0, 1]


def test_same_architecture_two_recipes_are_two_models(tmp_path):
    """Two resnet18 runs at other sizes on the same holdout split: an ensemble of two models,
    not two folds of one (which would overlap); a model column in the CSV wins over config."""
    table = _table()
    val = table[table.fold == 1]
    r1 = _write_run(tmp_path / "r512", val.assign(prediction=0.2, fold=1),
                    _config("resnet18", 0, tmp_path / "r512", split="holdout", size=512))
    r1024 = _write_run(tmp_path / "r1024", val.assign(prediction=0.4, fold=1),
                       _config("resnet18", 0, tmp_path / "r1024", split="holdout", size=1024))
    oof = merge_oof([r1, r1024])
    assert oof.attrs["models"] == ["resnet18[size=1024]", "resnet18[size=512]"]
    assert np.allclose(oof.prediction, 0.3) and len(oof) == len(val)
    r3 = _write_run(tmp_path / "named", val.assign(prediction=0.9, model="mine"))
    assert "mine" in merge_oof([r1, r3]).attrs["models"]


def test_labels_must_agree(runs, tmp_path):
    dirs, table = runs
    flipped = pd.read_csv(dirs[0] / "val_predictions.csv")
    flipped["cancer"] = 1 - flipped["cancer"]
    other = _write_run(tmp_path / "other" / "fold0", flipped, _config("x", 0, "o"))
    with pytest.raises(RsnaError, match="cancer label differs"):
        merge_oof(dirs + [other])


def test_the_ensemble_records_whether_its_oof_scores_had_the_flip(runs, tmp_path):
    """TrainConfig.tta in every run's config.json: ensemble.json says tta true; runs written
    before the setting (none in config.json) did not flip; mixed runs are refused."""
    dirs, _ = runs
    assert write_ensemble(dirs, tmp_path / "plain.json")["tta"] is False
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "tta": True}))
    assert json.loads(json.dumps(write_ensemble(dirs, tmp_path / "t.json")))["tta"] is True
    cfg = json.loads((dirs[0] / "config.json").read_text())
    (dirs[0] / "config.json").write_text(json.dumps({**cfg, "tta": False}))
    with pytest.raises(RsnaError, match=r"validated with the flip.*and \[.*fold0'\] without"):
        merge_oof(dirs)


def test_submission_tta_follows_the_tuned_threshold():
    from rsna_utils.infer.ensemble import Ensemble, submission_tta
    assert Ensemble({"threshold": 0.3, "tta": True}).tuned_tta is True
    assert Ensemble({"threshold": 0.3}).tuned_tta is False              # written before the key
    assert Ensemble({"threshold": None}).tuned_tta is None              # nothing tuned
    assert submission_tta(True, None) is True and submission_tta(True, True) is True
    assert submission_tta(False, None) is False and submission_tta(None, None) is False
    with pytest.raises(RsnaError, match=r"ens\.json: its threshold \(and calibrator\) were tuned "
                                         r"on validation scores without the horizontal flip, but "
                                         r"tta is True; drop tta"):
        submission_tta(False, True, source="ens.json")
    with pytest.raises(RsnaError, match="with the horizontal flip, but tta is False"):
        submission_tta(True, False)
    assert submission_tta(True, False, cut=False) is False           # probabilities: as asked
    assert submission_tta(None, True) is True                         # unknown: as asked


def test_folds_trained_before_a_new_setting_are_one_model_with_the_newer_folds(runs):
    """Fold 0 of a model trained before TrainConfig had `tta`/`backbone_lr` (absent from its
    config.json) and fold 1 trained after (written at their defaults): one model, not two."""
    dirs, _ = runs
    cfg = json.loads((dirs[1] / "config.json").read_text())
    (dirs[1] / "config.json").write_text(json.dumps({**cfg, "tta": False, "backbone_lr": 1.0}))
    oof = merge_oof(dirs)
    assert oof.attrs["models"] == ["effnet_b2", "resnet18"]
    (dirs[1] / "config.json").write_text(json.dumps({**cfg, "backbone_lr": 0.1}))
    with pytest.raises(RsnaError, match="not scored by every model"):   # another recipe
        merge_oof(dirs)


def test_inference_weighs_checkpoints_by_the_ensembles_recipe_weights():
    from rsna_utils.infer.oof import model_weights
    keys = ["A", "A", "A", "A", "B", "B"]                  # 4 folds of A, 2 of B
    np.testing.assert_allclose(model_weights(keys), [1 / 8] * 4 + [1 / 4] * 2)
    np.testing.assert_allclose(model_weights(keys, {"A": 0.9, "B": 0.1}), [0.225] * 4 + [0.05] * 2)
    np.testing.assert_allclose(model_weights(keys, {"A": 1.0, "B": 0.0}), [0.25] * 4 + [0, 0])
    with pytest.raises(RsnaError, match="1 checkpoint recipe.s. have no weight in the ensemble"):
        model_weights(keys + ["C"], {"A": 0.5, "B": 0.5})


def test_binarize_quantile_flags_the_out_of_fold_positive_rate():
    """`--binarize quantile` with an ensemble: the share of breasts its tuned cut called on the
    out-of-fold scores; without an ensemble, or with no rate stored, one line with the fix."""
    from rsna_utils.core.errors import RsnaError
    from rsna_utils.infer.ensemble import Ensemble
    from rsna_utils.infer.predict import PredictConfig
    ens = Ensemble({"threshold": 0.3, "quantile": 0.0425, "binarize": "threshold", "agg": "mean",
                    "tta": False})
    got = ens.predict_settings({"binarize_how": "quantile", "tta": False})
    assert got["binarize_how"] == "quantile:0.0425"
    assert ens.predict_settings({"tta": False})["binarize_how"] == "threshold"
    assert PredictConfig("i", "c.csv", ["x.pt"], **{k: got[k] for k in ("binarize_how", "tta")}
                         ).binarize_how == "quantile:0.0425"
    with pytest.raises(RsnaError, match="no out-of-fold positive rate"):
        Ensemble({"threshold": 0.3, "agg": "mean", "tta": False}).predict_settings(
            {"binarize_how": "quantile", "tta": False})
    with pytest.raises(RsnaError, match="binarize quantile: .*pass --ensemble .*quantile:Q"):
        PredictConfig("i", "c.csv", ["x.pt"], binarize_how="quantile")
