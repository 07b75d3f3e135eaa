import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.predict import aggregate, binarize, predict, validate_submission


def test_rsna_predict_writes_a_valid_submission(tmp_path, synth_small, tiny_ckpt):
    out = tmp_path / "submission.csv"
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "predict",
                        "--images", str(synth_small / "test_images"),
                        "--csv", str(synth_small / "test.csv"), "--checkpoints", str(tiny_ckpt),
                        "--out", str(out), "--sample-submission", str(synth_small / "sample_submission.csv"),
                        "--labels", str(synth_small / "test_labels.csv"), "--tta", "--workers", "1",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    sub = pd.read_csv(out)
    sample = pd.read_csv(synth_small / "sample_submission.csv")
    assert list(sub.columns) == ["prediction_id", "cancer"]
    assert list(sub.prediction_id) == list(sample.prediction_id)
    assert sub.cancer.between(0, 1).all() and sub.cancer.notna().all()
    assert "breast_mean" in r.stdout and "AUC" in r.stdout
    assert pd.read_csv(tmp_path / "submission_warnings.csv").empty


def test_unreadable_images_still_get_a_row(tmp_path, synth_small, tiny_ckpt):
    images = tmp_path / "test_images"
    shutil.copytree(synth_small / "test_images", images)
    test = pd.read_csv(synth_small / "test.csv")
    first = test.iloc[0]
    (images / str(first.patient_id) / f"{first.image_id}.dcm").unlink()          # missing
    second = test.iloc[1]
    (images / str(second.patient_id) / f"{second.image_id}.dcm").write_bytes(b"garbage" * 50)
    # every view of one breast unreadable -> the prior
    last_breast = test.prediction_id.iloc[-1]
    for r in test[test.prediction_id == last_breast].itertuples():
        (images / str(r.patient_id) / f"{r.image_id}.dcm").unlink()
    res = predict(images, synth_small / "test.csv", [tiny_ckpt], tmp_path / "s.csv",
                  synth_small / "sample_submission.csv", workers=0, device="cpu", progress=False,
                  max_unreadable=1.0)       # more than the default share: asked for here
    assert len(res.submission) == test.prediction_id.nunique()
    warned = {w["image_id"] for w in res.warnings}
    assert {first.image_id, second.image_id} <= warned
    reasons = " ".join(w["reason"] for w in res.warnings)
    assert "file not found" in reasons and "not a readable DICOM" in reasons
    prior = torch.load(tiny_ckpt, weights_only=True)["prior"]
    assert res.submission.set_index("prediction_id").loc[last_breast, "cancer"] == pytest.approx(prior)
    w = pd.read_csv(tmp_path / "s_warnings.csv")
    assert set(w.image_id) == warned


def test_a_missing_images_folder_stops_before_anything_is_written(tmp_path, capsys, synth_small,
                                                                  tiny_ckpt):
    """A typo in --images used to write a complete submission of training priors, exit 0."""
    from rsna_utils.app.cli import main
    out = tmp_path / "sub.csv"
    code = main(["predict", "--images", str(tmp_path / "test_imgs"), "--csv",
                 str(synth_small / "test.csv"), "--checkpoints", str(tiny_ckpt), "--out", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "test_imgs: images folder not found; pass the folder that holds" in err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_too_many_unreadable_images_stop_without_a_submission(tmp_path, synth_small, tiny_ckpt):
    images = tmp_path / "test_images"
    shutil.copytree(synth_small / "test_images", images)
    test = pd.read_csv(synth_small / "test.csv")
    for r in test.iloc[:3].itertuples():
        (images / str(r.patient_id) / f"{r.image_id}.dcm").write_bytes(b"not a dicom" * 40)
    args = (images, synth_small / "test.csv", [tiny_ckpt], tmp_path / "s.csv")
    kw = dict(workers=0, device="cpu", progress=False)
    with pytest.raises(RsnaError, match=rf"^3 of {len(test)} images \(\d+%\) could not be read, "
                                        r"more than max_unreadable=0.05; no submission written "
                                        r"\(the list with each reason: .*s_warnings.csv; the first: "
                                        r".*not a readable DICOM.*raise --max-unreadable"):
        predict(*args, **kw)
    assert not (tmp_path / "s.csv").exists()
    assert len(pd.read_csv(tmp_path / "s_warnings.csv")) == 3
    res = predict(*args, max_unreadable=0.5, **kw)          # said so: the priors go in
    assert len(res.submission) == test.prediction_id.nunique() and (tmp_path / "s.csv").exists()


def test_missing_and_garbage_checkpoints_say_what_they_are(tmp_path, capsys, synth_small):
    """Before: a missing best.pt got the pretrained-weights advice (which then failed again) and
    random bytes `unreadable checkpoint (KeyError: 101)`."""
    from rsna_utils.app.cli import main

    def run(ckpt):
        code = main(["predict", "--images", str(synth_small / "test_images"), "--csv",
                     str(synth_small / "test.csv"), "--checkpoints", str(ckpt), "--out",
                     str(tmp_path / "s.csv"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err
    fix = "pass a best.pt (or last.pt) written by `rsna train`"
    assert f"best.pt: checkpoint not found; {fix}" in run(tmp_path / "best.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    assert "garbage.pt: not a checkpoint of `rsna train`: 4,096 bytes that are no PyTorch" in run(garbage)
    note = tmp_path / "note.pt"
    note.write_text("<html>404 Not Found</html>")
    assert "note.pt: not a checkpoint of `rsna train`: a text file" in run(note)
    weights = tmp_path / "backbone.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    assert "backbone.pt: not a checkpoint of `rsna train`: tensors without the training settings" in run(weights)
    assert "a folder, not a checkpoint" in run(tmp_path)
    assert not (tmp_path / "s.csv").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, synth_small, tiny_ckpt):
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["model_name"] = "efficientnet_b0"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(RsnaError, match="do not fit a 'efficientnet_b0' model"):
        predict(synth_small / "test_images", synth_small / "test.csv", [tmp_path / "other.pt"],
                None, workers=0, device="cpu", progress=False)
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["preprocess"]["margin"] = 0.1
    torch.save(ck, tmp_path / "p64.pt")
    with pytest.raises(RsnaError, match="ensemble must share"):
        predict(synth_small / "test_images", synth_small / "test.csv", [tiny_ckpt, tmp_path / "p64.pt"],
                None, workers=0, device="cpu", progress=False)


def test_validation_refuses_bad_submissions():
    ids = ["1_L", "1_R"]
    ok = pd.DataFrame({"prediction_id": ids, "cancer": [0.1, 0.9]})
    validate_submission(ok, ids)
    with pytest.raises(RsnaError, match="NaN"):
        validate_submission(ok.assign(cancer=[np.nan, 0.2]), ids)
    with pytest.raises(RsnaError, match="outside"):
        validate_submission(ok.assign(cancer=[1.5, 0.2]), ids)
    with pytest.raises(RsnaError, match="1 missing"):
        validate_submission(ok.iloc[:1], ids)
    with pytest.raises(RsnaError, match="duplicated"):
        validate_submission(pd.concat([ok, ok]), ids)


def test_aggregate_and_binarize():
    imgs = pd.DataFrame({"prediction_id": ["a", "a", "b", "c"], "prediction": [0.2, 0.4, np.nan, 0.9]})
    m = aggregate(imgs, "mean", prior=0.05).set_index("prediction_id").prediction
    assert m["a"] == pytest.approx(0.3) and m["b"] == 0.05 and m["c"] == 0.9
    assert aggregate(imgs, "max").set_index("prediction_id").prediction["a"] == 0.4
    v = np.linspace(0, 1, 101)
    assert binarize(v, "threshold", 0.5).sum() == 51
    assert binarize(v, "quantile:0.1", 0.5).sum() == 11
    with pytest.raises(RsnaError):
        binarize(v, "quantile:2", 0.5)


def test_ensemble_threshold_refuses_another_aggregation(tmp_path, capsys):
    import json

    from rsna_utils.app.cli import main
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"threshold": 0.3, "agg": "max", "binarize": "threshold"}))
    rc = main(["predict", "--images", str(tmp_path), "--csv", str(tmp_path / "t.csv"),
               "--checkpoints", str(tmp_path / "b.pt"), "--ensemble", str(ens), "--agg", "mean"])
    assert rc == 2 and "tuned on max-aggregated" in capsys.readouterr().err
    ens.write_text("{}")
    rc = main(["predict", "--images", str(tmp_path), "--csv", str(tmp_path / "t.csv"),
               "--checkpoints", str(tmp_path / "b.pt"), "--ensemble", str(ens)])
    assert rc == 2 and "rsna oof" in capsys.readouterr().err


def test_output_modes_do_what_they_say():
    from rsna_utils.infer.calibrate import apply_calibrator
    from rsna_utils.infer.predict import breast_output, resolve_output
    cal = {"method": "platt", "a": 1.0, "b": -np.log(25), "agg": "mean"}
    v = np.array([0.05, 0.3, 0.6, 0.9])
    assert breast_output(v, "probability") is v
    c = breast_output(v, "calibrated", calibrator=cal, unread=np.array([0, 0, 1, 0], bool))
    odds = v / (1 - v) / 25
    np.testing.assert_allclose(c[[0, 1, 3]], (odds / (1 + odds))[[0, 1, 3]])
    assert c[2] == 0.6                           # an unreadable breast keeps the prior
    np.testing.assert_array_equal(breast_output(v, "binary", "threshold", 0.3), [0, 1, 1, 1])
    # binary cuts the raw score: calibrating first then cutting at the raw threshold would not
    assert (apply_calibrator(cal, v) >= 0.3).sum() == 0
    assert resolve_output(None, None) == ("probability", None)
    assert resolve_output(None, "quantile:0.1") == ("binary", "quantile:0.1")
    assert resolve_output("binary", None) == ("binary", "threshold")
    assert resolve_output("calibrated", None, cal) == ("calibrated", None)
    with pytest.raises(RsnaError, match="needs a calibrator.*--ensemble"):
        resolve_output("calibrated", None)
    with pytest.raises(RsnaError, match="--binarize threshold with --output probability"):
        resolve_output("probability", "threshold")
    with pytest.raises(RsnaError, match="fitted on mean-aggregated.*--agg mean"):
        resolve_output("calibrated", None, cal, agg="max")
    with pytest.raises(RsnaError, match="output 'logit'"):
        resolve_output("logit", None)


def test_predict_writes_probability_calibrated_and_binary(tmp_path, synth_small, tiny_ckpt):
    from rsna_utils.infer.calibrate import apply_calibrator
    from rsna_utils.reports.evaluate import load_predictions
    cal = {"method": "platt", "a": 2.0, "b": -3.0, "agg": "mean"}
    kw = dict(workers=0, device="cpu", progress=False)
    args = (synth_small / "test_images", synth_small / "test.csv", [tiny_ckpt])
    prob = predict(*args, tmp_path / "p.csv", labels=synth_small / "test_labels.csv", **kw)
    calib = predict(*args, tmp_path / "c.csv", output="calibrated", calibrator=cal, **kw)
    binary = predict(*args, tmp_path / "b.csv", output="binary", threshold=0.5, **kw)
    p = prob.submission.cancer.to_numpy()
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(calib.submission.cancer, apply_calibrator(cal, p), rtol=1e-6)
    np.testing.assert_array_equal(binary.submission.cancer, (p >= 0.5).astype(float))
    # the image-level file, with labels, is what `rsna evaluate --predictions` reads
    imgs = load_predictions(tmp_path / "p_images.csv")
    assert len(imgs) == len(pd.read_csv(synth_small / "test.csv"))
    assert imgs.cancer.sum() > 0
    assert not pd.read_csv(tmp_path / "c_images.csv").columns.isin(["cancer"]).any()


def test_cli_output_calibrated_needs_the_ensemble_calibrator(tmp_path, capsys):
    import json

    from rsna_utils.app.cli import main
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"threshold": 0.3, "agg": "mean", "binarize": "threshold"}))
    base = ["predict", "--images", str(tmp_path), "--csv", str(tmp_path / "t.csv"),
            "--checkpoints", str(tmp_path / "b.pt")]
    assert main(base + ["--ensemble", str(ens), "--output", "calibrated"]) == 2
    assert "no calibrator" in capsys.readouterr().err
    assert main(base + ["--output", "calibrated"]) == 2
    assert "needs a calibrator" in capsys.readouterr().err


def test_inference_reads_the_input_contract_from_the_checkpoint(tmp_path, synth_small, tiny_ckpt,
                                                                monkeypatch):
    """Size, channels, mean / std and the PNG -> input resize come from the checkpoint, not
    from defaults: a checkpoint with other values is fed exactly those."""
    import rsna_utils.learn.data
    from rsna_utils.infer.predict import LoadedModel, load_models
    from rsna_utils.learn.checkpoint import INPUT_RESIZE
    ck = torch.load(tiny_ckpt, weights_only=True)
    assert ck["resize"] == INPUT_RESIZE and ck["channels"] == 3 and ck["size"] == [48, 48]
    norm = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    assert tuple(map(tuple, norm)) != LoadedModel.norm
    ck.update(size=[40, 56], norm=norm)               # resnet pools globally: any size runs
    torch.save(ck, tmp_path / "other.pt")
    (m,), _ = load_models([tmp_path / "other.pt"], torch.device("cpu"))
    assert (m.size, m.norm, m.channels) == ((40, 56), tuple(map(tuple, norm)), 3)
    seen = []
    real = rsna_utils.learn.data.device_input

    def spy(raw, intensity, norm, channels, channels_last=False):
        seen.append((tuple(raw.shape[2:]), tuple(map(tuple, norm)), channels))
        return real(raw, intensity, norm, channels, channels_last)
    monkeypatch.setattr(rsna_utils.learn.data, "device_input", spy)
    predict(synth_small / "test_images", synth_small / "test.csv", [tmp_path / "other.pt"], None,
            workers=0, device="cpu", progress=False)
    assert seen and set(seen) == {((40, 56), tuple(map(tuple, norm)), 3)}
    x = rsna_utils.learn.data.model_input(np.full((48, 48), 255, np.uint8), (40, 56), norm, 3)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (1 - np.array(norm[0])) / np.array(norm[1]),
                               rtol=1e-6)
    ck["resize"] = {"mode": "stretch", "filter": "nearest"}
    torch.save(ck, tmp_path / "stretch.pt")
    with pytest.raises(RsnaError, match="trained with the input resize .*stretch"):
        load_models([tmp_path / "stretch.pt"], torch.device("cpu"))


def test_cli_ensemble_sets_the_flip_its_threshold_was_tuned_with(tmp_path):
    """`rsna predict --ensemble`: tta follows ensemble.json; a --tta that differs is refused
    (the cut would fall on scores of another distribution), unless --threshold replaces the cut
    or the output is a probability; calibrated output is checked whatever --threshold says."""
    import json

    from rsna_utils.app.steps import _ensemble_settings
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"threshold": 0.3, "agg": "mean", "tta": True}))
    assert _ensemble_settings(str(ens), {})["tta"] is True
    with pytest.raises(RsnaError, match=r"ensemble\.json: its threshold \(and calibrator\) were "
                                        r"tuned on validation scores with the horizontal flip, but "
                                        r"tta is False; drop tta"):
        _ensemble_settings(str(ens), {"tta": False})
    assert "tta" not in _ensemble_settings(str(ens), {"tta": False, "threshold": 0.5})
    assert "tta" not in _ensemble_settings(str(ens), {"tta": False, "output": "probability"})
    ens.write_text(json.dumps({"threshold": 0.3, "agg": "mean", "tta": True,
                               "calibrator": {"method": "platt", "a": 1.0, "b": 0.0}}))
    with pytest.raises(RsnaError, match="but tta is False"):    # the calibrator fits flipped scores
        _ensemble_settings(str(ens), {"tta": False, "threshold": 0.5, "output": "calibrated"})
    ens.write_text(json.dumps({"threshold": 0.3}))          # written before the key: no flip
    assert _ensemble_settings(str(ens), {})["tta"] is False


def test_an_ensemble_averages_folds_per_recipe_then_the_recipes(tmp_path, synth_small, tiny_ckpt):
    """Two folds of recipe A and one run of recipe B: the ensemble is mean(mean(A0, A1), B), the
    prediction `rsna oof` tunes its threshold on, not the flat mean of three checkpoints."""
    from rsna_utils.infer.oof import model_weights, recipe_key
    from rsna_utils.infer.predict import load_models, weighted_mean
    from rsna_utils.learn.checkpoint import checkpoint_recipe
    base = torch.load(tiny_ckpt, weights_only=False)
    head = [k for k in base["model"] if k.endswith("fc.bias")][0]
    paths = {}
    for name, shift, fold, seed, cut in (("a0", 0.0, 0, 42, 0.2), ("a1", 2.0, 1, 42, 0.4),
                                         ("b", -2.0, 0, 7, 0.6)):
        ck = {**base, "config": {**base["config"], "fold": fold, "seed": seed,
                                 "out": str(tmp_path / name)}, "threshold": cut}
        ck["model"] = {**base["model"], head: base["model"][head] + shift}
        paths[name] = tmp_path / name / "best.pt"
        paths[name].parent.mkdir()
        torch.save(ck, paths[name])
    models, _ = load_models(list(paths.values()), torch.device("cpu"))
    assert models[0].recipe == models[1].recipe != models[2].recipe
    # a config.json beside the checkpoint (what `rsna oof` reads; a resume rewrites it) wins
    (tmp_path / "b" / "config.json").write_text(json.dumps({**base["config"], "epochs": 99}))
    assert checkpoint_recipe(paths["b"], base["config"]) != models[0].recipe
    assert checkpoint_recipe(paths["a1"], base["config"]) == models[0].recipe
    # a config.json cut short (a run killed while writing it): the checkpoint's own settings
    (tmp_path / "b" / "config.json").write_text('{"model": "resn')
    assert checkpoint_recipe(paths["b"], base["config"]) == models[0].recipe
    # the key `rsna oof` gives the run folder (its config.json) is the checkpoint's
    run_cfg = json.loads((tiny_ckpt.parent / "config.json").read_text())
    assert models[0].recipe == recipe_key(run_cfg, tiny_ckpt.parent)[0]
    np.testing.assert_allclose(model_weights([m.recipe for m in models]), [0.25, 0.25, 0.5])
    # the default cut (no ensemble.json) averages the thresholds the same way: 0.45, not 0.4
    assert weighted_mean(models, "threshold") == pytest.approx(0.45)

    def images(ckpts):
        r = predict(synth_small / "test_images", synth_small / "test.csv", ckpts, None,
                    workers=0, device="cpu", progress=False)
        return r.images["prediction"].to_numpy(np.float64)
    one = {k: images([p]) for k, p in paths.items()}
    both = images(list(paths.values()))
    want = ((one["a0"] + one["a1"]) / 2 + one["b"]) / 2
    np.testing.assert_allclose(both, want, rtol=1e-5)
    flat = (one["a0"] + one["a1"] + one["b"]) / 3
    assert np.abs(both - flat).max() > 1e-3           # the weighting changes the answer


def test_an_exported_ensemble_keeps_the_recipes_of_its_run_folders(tmp_path, tiny_ckpt):
    """Fold 1 of recipe A was resumed with more epochs, so its best.pt (from before the resume)
    stores epochs 4 while its run folder says 6: the run folders group A's folds together.
    Exported flat for Kaggle (no run folders), ensemble.json keeps that grouping."""
    from rsna_utils.infer.ensemble import Ensemble
    from rsna_utils.infer.kaggle import export_models
    from rsna_utils.infer.predict import load_models
    base = torch.load(tiny_ckpt, weights_only=False)
    paths = []
    for name, fold, seed, stored_epochs in (("a_fold0", 0, 42, 6), ("a_fold1", 1, 42, 4),
                                            ("b", 0, 7, 6)):
        run_cfg = {**base["config"], "fold": fold, "seed": seed, "epochs": 6,
                   "out": str(tmp_path / "runs" / name)}
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(run_cfg))
        torch.save({**base, "config": {**run_cfg, "epochs": stored_epochs}}, run / "best.pt")
        paths.append(run / "best.pt")

    def groups(ckpts):
        r = [m.recipe for m in load_models(ckpts, torch.device("cpu"))[0]]
        return [r.index(k) for k in r]
    assert groups(paths) == [0, 0, 2]
    ens = Ensemble.read(export_models({"checkpoints": [str(p) for p in paths]},
                                      tmp_path / "rsna-models")["dir"])
    assert groups(ens["checkpoints"]) == [0, 0, 2]
    # without the recorded recipes the checkpoints' own settings would split recipe A
    exported = tmp_path / "rsna-models" / "ensemble.json"
    exported.write_text(json.dumps({k: v for k, v in json.loads(exported.read_text()).items()
                                    if k != "recipes"}))
    assert groups(ens["checkpoints"]) == [0, 1, 2]


def test_an_image_that_looks_inverted_is_scored_and_named_in_the_warnings(tmp_path, synth_small,
                                                                         tiny_ckpt):
    from fakes import negative_dicom
    images = tmp_path / "test_images"
    shutil.copytree(synth_small / "test_images", images)
    import pydicom
    test = pd.read_csv(synth_small / "test.csv")
    row = next(r for r in test.itertuples() if pydicom.dcmread(
        images / str(r.patient_id) / f"{r.image_id}.dcm", stop_before_pixels=True)
        .PhotometricInterpretation == "MONOCHROME2")
    path = images / str(row.patient_id) / f"{row.image_id}.dcm"
    bad = negative_dicom(path, tmp_path / "neg.dcm", "MONOCHROME2")      # a negative labelled M2
    path.write_bytes(bad.read_bytes())
    res = predict(images, synth_small / "test.csv", [tiny_ckpt], tmp_path / "s.csv",
                  workers=0, device="cpu", progress=False)
    assert [w["image_id"] for w in res.warnings] == [row.image_id]
    assert "looks inverted" in res.warnings[0]["reason"] and "--inverted fix" in res.warnings[0]["reason"]
    assert res.images.set_index("image_id").prediction.notna().all()     # scored all the same
    assert pd.read_csv(tmp_path / "s_warnings.csv").image_id.tolist() == [row.image_id]
    assert res.images.set_index("image_id").looks_inverted.to_dict() == {
        i: i == row.image_id for i in test.image_id}
    assert res.counts() == "0 unreadable, 1 look inverted"
    # a model trained on PNGs made with --inverted fix: inverted before scoring, no warning
    ck = torch.load(tiny_ckpt, weights_only=False)
    torch.save(dict(ck, preprocess=dict(ck["preprocess"], inverted="fix")), tmp_path / "fix.pt")
    fixed = predict(images, synth_small / "test.csv", [tmp_path / "fix.pt"], tmp_path / "f.csv",
                    workers=0, device="cpu", progress=False)
    assert fixed.warnings == [] and int(fixed.images.looks_inverted.sum()) == 1
    p = lambda r: r.images.set_index("image_id").prediction
    assert p(fixed).loc[row.image_id] != p(res).loc[row.image_id]          # other pixels scored
    assert (p(fixed).drop(row.image_id) == p(res).drop(row.image_id)).all()


def test_checkpoints_from_before_a_preprocessing_setting_load_with_new_ones(tmp_path, synth_small,
                                                                          tiny_ckpt):
    """A checkpoint without the `inverted` setting means "warn" (the pixels it was trained on):
    it ensembles with a new one; one that says "fix" does not, and the error says why."""
    from rsna_utils.infer.predict import load_models
    ck = torch.load(tiny_ckpt, weights_only=False)
    assert ck["preprocess"]["inverted"] == "warn"
    old = dict(ck, preprocess={k: v for k, v in ck["preprocess"].items() if k != "inverted"})
    torch.save(old, tmp_path / "old.pt")
    models, pre = load_models([tiny_ckpt, tmp_path / "old.pt"], torch.device("cpu"))
    assert len(models) == 2 and pre["inverted"] == "warn"
    torch.save(dict(ck, preprocess=dict(ck["preprocess"], inverted="fix")), tmp_path / "fix.pt")
    with pytest.raises(RsnaError, match="fix.pt: preprocessing or channels differ"):
        load_models([tiny_ckpt, tmp_path / "fix.pt"], torch.device("cpu"))


def test_ensemble_weights_apply_to_all_checkpoints_or_say_which_recipe_has_none(tiny_ckpt):
    """The weights rsna oof tuned for must not fall back to equal votes silently when the
    checkpoints given are other runs (reviewer's case: no recipe matches)."""
    from rsna_utils.infer.predict import ensemble_weights, load_models, set_recipe_weights
    models, _ = load_models([tiny_ckpt, tiny_ckpt], torch.device("cpu"))
    set_recipe_weights(models, {models[0].recipe: 1.0})
    np.testing.assert_allclose(ensemble_weights(models), [0.5, 0.5])
    with pytest.raises(RsnaError, match=r"best.pt: its training recipe has no weight in the "
                                        r"ensemble \(2 of 2 checkpoint"):
        set_recipe_weights(models, {"config:another recipe": 1.0})
    set_recipe_weights(models, None)
    assert all(m.recipe_weight is None for m in models)


def test_inference_builds_each_input_once_for_all_folds_and_flips(tmp_path, synth_small,
                                                                   tiny_ckpt, monkeypatch):
    """Three checkpoints, two at one input size and one at another: each batch is resized and
    normalised once per size (not once per checkpoint), and the scores equal each checkpoint's
    own input built the training way (`data.model_input`), averaged."""
    import rsna_utils.learn.data
    from rsna_utils.infer.predict import ensemble_weights, load_models
    from rsna_utils.learn.checkpoint import cancer_probability
    base = torch.load(tiny_ckpt, weights_only=False)
    head = [k for k in base["model"] if k.endswith("fc.bias")][0]
    paths = []
    for k, (shift, size) in enumerate(((0.0, [48, 48]), (1.0, [48, 48]), (-1.0, [40, 56]))):
        ck = {**base, "size": size, "config": {**base["config"], "fold": k}}
        ck["model"] = {**base["model"], head: base["model"][head] + shift}
        paths.append(tmp_path / f"f{k}.pt")
        torch.save(ck, paths[-1])
    calls = []
    real = rsna_utils.learn.data.device_input

    def spy(raw, intensity, norm, channels, channels_last=False):
        calls.append(tuple(raw.shape))
        return real(raw, intensity, norm, channels, channels_last)
    monkeypatch.setattr(rsna_utils.learn.data, "device_input", spy)
    r = predict(synth_small / "test_images", synth_small / "test.csv", paths, None, workers=0,
                device="cpu", progress=False, tta=True, batch_size=64)
    n = len(r.images)
    assert sorted(calls) == sorted([(n, 1, 48, 48), (n, 1, 40, 56)])    # one batch, two sizes
    # the reference: every checkpoint on its own input, built image by image as in training
    from rsna_utils.infer.predict import DicomStream
    models, pre = load_models(paths, torch.device("cpu"))
    assert r.images["prediction"].notna().all()
    stream = DicomStream(r.images, synth_small / "test_images", pre)
    imgs = [stream[i][0] for i in range(n)]
    want = np.zeros(n)
    for m, w in zip(models, ensemble_weights(models)):
        x = torch.stack([rsna_utils.learn.data.model_input(im, m.size, m.norm, 3) for im in imgs])
        with torch.inference_mode():
            want += w * cancer_probability(m.model, x, True).numpy()
    np.testing.assert_allclose(r.images["prediction"].to_numpy(), want, rtol=1e-4, atol=1e-6)


def test_an_ensemble_written_by_0_2_still_weighs_its_checkpoints_moved_elsewhere(tmp_path,
                                                                                 tiny_ckpt):
    """0.2 keyed "recipe_weights" and "recipes" by recipes holding the runs' whole data and csv
    paths; its ensemble.json, read where the runs' folders say another place, still gives each
    checkpoint its recipe's vote (the same keys, their paths cut as this version cuts them)."""
    from rsna_utils.infer.scoring import LoadedEnsemble
    from rsna_utils.learn.checkpoint import PER_RUN_FIELDS, _train_defaults, recipe_key
    base = torch.load(tiny_ckpt, weights_only=False)
    runs, old_keys = [], []
    for name, seed in (("a", 1), ("b", 2)):
        cfg = {**base["config"], "seed": seed, "data": f"/home/me/rsna/png{name}",
               "csv": "/home/me/rsna/train.csv", "out": f"/home/me/runs/{name}"}
        recipe = {k: v for k, v in {**_train_defaults(), **cfg}.items() if k not in PER_RUN_FIELDS}
        old_keys.append("config:" + json.dumps(recipe, sort_keys=True, default=str))  # as 0.2
        here = {**cfg, "data": str(tmp_path / "input" / f"png{name}"),
                "csv": str(tmp_path / "input" / "train.csv")}           # the runs, moved
        (tmp_path / name).mkdir()
        torch.save({**base, "config": here}, tmp_path / name / "best.pt")
        (tmp_path / name / "config.json").write_text(json.dumps(here))
        assert recipe_key(here, tmp_path / name)[0] != old_keys[-1]
        runs.append(f"{name}/best.pt")
    (tmp_path / "ensemble.json").write_text(json.dumps({
        "checkpoints": runs, "recipes": old_keys, "threshold": 0.5, "agg": "mean",
        "recipe_weights": {old_keys[0]: 0.75, old_keys[1]: 0.25}}))
    ens = LoadedEnsemble.from_json(tmp_path / "ensemble.json", torch.device("cpu"))
    assert [m.recipe_weight for m in ens.models] == [0.75, 0.25]
