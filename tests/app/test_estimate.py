"""`rsna notebooks --estimate`: a plan's steps timed from measured throughputs, memory measured."""
import math

import numpy as np
import pandas as pd
import pytest

from rsna_utils.app import estimate as est
from rsna_utils.core.errors import RsnaError


def test_throughput_scales_the_nearest_measured_size_by_pixels():
    tr, inf, src = est.throughput("resnext50_32x4d", (1024, 512), "h100")
    assert tr == pytest.approx(675 * 512 * 512 / (1024 * 512) * 0.85)
    assert inf == pytest.approx(2484 * 0.5 * 0.85)
    assert "scaled to 1024x512" in src
    tr, _, src = est.throughput("resnet18", (512, 512), "h200")
    assert tr == 2584 and "scaled" not in src                 # the measured size itself
    assert est.throughput("resnet18", (300, 300), "h200")[0] == pytest.approx(5323 * 256**2 / 300**2)
    with pytest.raises(RsnaError, match=r"model 'vit_huge': no measured throughput.*measured: "
                                        r"\['convnext_small'.*--calibrate"):
        est.throughput("vit_huge", (512, 512))


def test_a_model_never_measured_is_timed_as_its_named_stand_in():
    """The Lites (the demo's and the real-data instrument's model) are timed as the EfficientNet
    they are built on, and the source says so: before, the demo plan's estimate was an error."""
    assert est.throughput("tf_efficientnet_lite0", (512, 256), "h200")[:2] == \
        est.throughput("efficientnet_b0", (512, 256), "h200")[:2]
    src = est.throughput("tf_efficientnet_lite0", (512, 256), "h200")[2]
    assert src.startswith("efficientnet_b0 @512x512")
    assert "(standing in for tf_efficientnet_lite0, not measured itself)" in src


@pytest.mark.heavy          # runs backbones on the CPU (make test; not --fast)
def test_activation_memory_is_measured_and_grows_with_pixels():
    small = est.activation_bytes("resnet18", (64, 64), probe=(64, 64))
    assert small > 0
    assert est.activation_bytes("resnet18", (128, 128), probe=(64, 64)) == pytest.approx(4 * small)
    # bf16 autocast keeps the convolutions' outputs at 2 bytes: less than the fp32 weights'
    # 4 bytes per value of the same tensors would take
    assert est.training_memory_gib("resnet18", (64, 64), 1, ema=True) > \
        est.training_memory_gib("resnet18", (64, 64), 1, ema=False)


def test_training_step_uses_the_samplers_epoch_and_the_plans_settings(tmp_path):
    """The kaggle balance on the competition's counts: a 1:7 sampler makes the positives 12.5%
    of the epoch; time = epochs x (epoch / train speed + validation / inference speed)."""
    params = dict(csv=str(tmp_path / "absent.csv"), model="resnet18", size=[512, 256],
                  batch_size=64, epochs=2, split="kfold", folds=4, upsample=1.0,
                  target_ratio="1:7", min_positives=1, pos_weight=1.0, tta=True)
    e = est.estimate_training(params, "h200", memory=False)
    assert "the competition's train.csv (54,706 images" in e.note
    assert e.batches == math.ceil(e.images / 64)
    n_train = e.images * 7 / 8 / (1 - 1 / 4)          # negatives are 7/8 of the epoch
    assert n_train == pytest.approx(54_706, rel=0.03)
    tr, inf, _ = est.throughput("resnet18", (512, 256), "h200")
    feed = est.worker_img_s(2, (512, 256), "h200")          # TrainConfig's 2 workers, no augment
    assert feed < tr and feed < inf and "input-bound (2 workers)" in e.note
    want = 2 * (e.images / min(tr, feed) + 54_706 / 4 * 2 / min(inf, feed)) / 3600
    assert e.hours == pytest.approx(want, rel=0.01)
    # a train.csv at hand is read: half positive, no sampler
    pd.DataFrame({"cancer": np.r_[np.ones(50), np.zeros(50)].astype(int)}).to_csv(
        tmp_path / "train.csv", index=False)
    e2 = est.estimate_training({**params, "csv": str(tmp_path / "train.csv"), "target_ratio": None,
                                "min_positives": 0}, "h200", memory=False)
    assert 60 <= e2.images <= 90 and str(tmp_path / "train.csv") in e2.note


@pytest.mark.heavy          # runs backbones on the CPU (make test; not --fast)
def test_the_kaggle_plan_fits_its_budget_on_one_h100_and_says_its_time(capsys):
    from rsna_utils.app.cli import main
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| 03_train")]
    assert len(rows) == 7 and sum("convnext_small 2048x1024" in r for r in rows) == 4
    mems = [float(r.split("|")[7]) for r in rows]
    assert max(mems) < 0.9 * 80 and "(over!)" not in out
    total = float(out.split("**all**")[1].split("**")[1])
    assert 12 < total <= 24                    # hours on one H100, within the plan's budget
    assert f"plan kaggle: {total:.1f} h on one H100, within its budget of 24 h" in out
    assert "one H100 at 0.85 of an H200 (an assumption" in out
    # the ConvNeXt is GPU-bound: the PNGs do not slow it; the sources not here are counted
    assert "convnext_small @2048x1024 on an H200; 40 img/s, GPU-bound" in out
    assert "source vindr: 20,000 images x weight 1 (its published size" in out
    assert "| 36,700 |" in out and "4 checkpoints without the flip" in out
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent",
                 "--variant", "12h"]) == 0
    out = capsys.readouterr().out
    short = float(out.split("**all**")[1].split("**")[1])
    assert short <= 12 < total and "within its budget of 12 h" in out


def test_a_plan_over_its_budget_or_an_unknown_variant_is_one_line(capsys, monkeypatch):
    from rsna_utils.app.cli import main
    # the memory column (forward passes of four backbones) is not what this is about
    monkeypatch.setattr(est, "training_memory_gib", lambda *a, **k: 1.0)
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent",
                 "--budget-hours", "5"]) == 2
    err = capsys.readouterr().err
    assert "plan kaggle: " in err and "over its budget of 5 h; nothing was run" in err
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent",
                 "--variant", "6h"]) == 2
    assert "plan kaggle: no variant '6h'; its variants: ['12h']" in capsys.readouterr().err


def test_a_gpu_bound_model_is_not_slowed_by_the_pngs_and_a_fast_one_waits_for_them():
    big = dict(csv="/nonexistent.csv", model="convnext_small", size=[2048, 1024], batch_size=4,
               epochs=1, split="kfold", folds=4, workers=12, augment=True,
               extra={"aug_level": "heavy"}, min_positives=0)
    e = est.estimate_training(big, "h100", memory=False)
    tr, inf, _ = est.throughput("convnext_small", (2048, 1024), "h100")
    assert f"{tr:.0f} img/s, GPU-bound" in e.note
    assert e.hours == pytest.approx((e.images / tr + 54_706 / 4 / inf) / 3600, rel=0.01)
    # heavy augmentation costs the workers time; a fast model at a small input waits for them
    assert est.worker_img_s(12, (512, 256), "h100", "heavy") < est.worker_img_s(12, (512, 256), "h100")
    small = {**big, "model": "resnet18", "size": [512, 256], "batch_size": 64}
    assert "input-bound (12 workers)" in est.estimate_training(small, "h100", memory=False).note
    # a calibrated rate replaces the anchor
    e2 = est.estimate_training(big, "h100", memory=False,
                               rates={("convnext_small", (2048, 1024)): (tr / 2, inf)})
    assert "measured here (--calibrate)" in e2.note and e2.hours > 1.8 * e.hours * 0.9


def test_sources_lengthen_the_epoch_by_their_weights(tmp_path):
    pd.DataFrame({"image_id": range(100)}).to_csv(tmp_path / "train.csv", index=False)
    total, held, lines = est.source_images([
        {"name": "rsna", "dir": "/x", "weight": 1.0},
        {"name": "cbis-ddsm", "dir": str(tmp_path), "weight": 0.5},
        {"name": "vindr", "dir": str(tmp_path / "absent"), "weight": 1.0, "optional": True}])
    assert total == 0.5 * 100 + 20_000 and held == 100 + 20_000
    assert "cbis-ddsm: 100 images x weight 0.5" in lines[0]
    assert "published size; the folder is not at hand, so a run now would skip it" in lines[1]
    base = dict(csv="/nonexistent.csv", model="resnet18", size=[512, 256], batch_size=64,
                epochs=1, split="kfold", folds=4, target_ratio="1:7", min_positives=1)
    a = est.estimate_training(base, "h100", memory=False)
    b = est.estimate_training(base, "h100", memory=False, extra_images=total)
    assert b.images - a.images == pytest.approx(total, abs=2)


def test_the_table_flags_a_batch_that_does_not_fit():
    rows = [est.StepEstimate("s", "train x", 10, 1, 1, 0.1, memory_gib=79.0)]
    assert "79.0 (over!)" in est.table(rows, "h100")
    assert "(over!)" not in est.table(rows, "h200")
    with pytest.raises(RsnaError, match="gpu 'a100': choose h100 or h200"):
        est.estimate_plan("kaggle", gpu="a100")


def test_the_estimate_refuses_a_ratio_the_per_batch_rule_cannot_keep(tmp_path):
    params = dict(csv=str(tmp_path / "absent.csv"), model="convnext_small", size=[2048, 1024],
                  batch_size=4, epochs=1, split="kfold", folds=4, target_ratio="1:7",
                  min_positives=1)
    with pytest.raises(RsnaError, match="cannot be met with min_positives=1 in a batch of 4"):
        est.estimate_training(params, memory=False)


def test_the_submit_plan_on_kaggles_t4_decodes_once_and_follows_the_ensembles_flip(capsys):
    """The submit plan (no training steps) is timed with the models the kaggle plan exports on
    the hidden test set's 36,700 images: decoding once (the T4 box's 4 cores), then every
    checkpoint at its own ceiling, twice with the flip: by default as the ensemble validated
    (the kaggle plan: no flip), or as asked."""
    from rsna_utils.app.cli import main
    assert est.preprocess_img_s("t4") == pytest.approx(min(42.5 * 4 / 16, 193.2 / 15))
    assert est.preprocess_img_s("h200") == pytest.approx(42.5)
    hours = {}
    for flip in (None, "true", "false"):
        assert main(["notebooks", "--plan", "submit", "--estimate", "--gpu", "t4", "--data",
                     "/nonexistent"] + (["-p", f"tta={flip}"] if flip else [])) == 0
        out = capsys.readouterr().out
        row = next(r for r in out.splitlines() if r.startswith("| 04_inference"))
        assert "4 checkpoints" in row and "| 36,700 |" in row
        assert ("with the flip" in row) == (flip == "true")
        hours[flip] = float(row.split("|")[6])
        assert "one T4 at 0.067 of an H200" in out and "DICOM reading at 10.6 img/s" in out
    decode = 36_700 / est.preprocess_img_s("t4") / 3600
    assert hours["true"] - decode == pytest.approx(2 * (hours["false"] - decode), rel=0.01)
    assert hours[None] == hours["false"] < 9 * 0.7          # Kaggle's 9 h, with room


def test_a_plan_step_the_estimate_refuses_is_named(capsys, monkeypatch):
    from rsna_utils.app.cli import main
    monkeypatch.setattr(est, "training_memory_gib", lambda *a, **k: 1.0)    # not the point
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent", "-p",
                 "03_train_resnext50_1024x512_fold0.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "plan step 03_train_resnext50_1024x512_fold0: target_ratio=0.125 cannot be met" in err


def test_a_breast_level_step_counts_the_views_it_reads(tmp_path):
    """level breast (issue 41): the epoch is in breasts, each read with the views breast_views
    says (all by default: 2.30 a breast in the competition's table; 2; or random 1 to all);
    time follows the views read, memory the step with the most of them (a batch is padded to
    its breast of most views, and the backbone runs on the views present)."""
    params = dict(csv=str(tmp_path / "absent.csv"), model="resnet18", size=[512, 256],
                  batch_size=32, epochs=1, split="kfold", folds=4, upsample=1.0,
                  target_ratio=None, min_positives=0, tta=False)
    img = est.estimate_training(params, "h200", memory=True)
    base = {**params, "level": "breast", "batch_size": 16}
    every = est.estimate_training(base, "h200", memory=True)
    two = est.estimate_training({**base, "breast_views": "2"}, "h200", memory=True)
    rnd = est.estimate_training({**base, "breast_views": "random"}, "h200", memory=True)
    mean = 54_706 / 23_826
    assert "per breast" in every.note and "breasts" in every.what
    assert "2.30 views a breast (breast_views all)" in every.note
    assert every.images == pytest.approx(img.images, rel=0.02)    # every view: the image epoch
    assert every.hours == pytest.approx(img.hours, rel=0.02)
    assert two.images == pytest.approx(every.images * 2 / mean, rel=0.01)
    assert rnd.images == pytest.approx(every.images * (mean + 1) / 2 / mean, rel=0.01)
    assert two.batches == every.batches == rnd.batches               # an epoch is in breasts
    # 16 breasts x 2 = 32 images, and the 32 slots of float input the image model's count skips
    assert two.memory_gib == pytest.approx(img.memory_gib + 32 * 3 * 512 * 256 * 4 / 2**30,
                                           rel=0.01)
    most, slots = (int(every.note.split(k, 1)[1].split(",")[0].split(" ")[0])
                   for k in ("memory for the most, ", "the widest batch, "))
    assert 16 * mean < most <= 16 * 8 and most <= slots <= 16 * 8
    assert every.memory_gib > two.memory_gib
    assert est.estimate_training(base, "h200", memory=True).memory_gib == every.memory_gib
    # other sources' images are breasts of the views a breast has, read as breast_views says
    extra = {v: est.estimate_training({**base, "breast_views": v}, "h200", memory=False,
                                      extra_images=23_000) for v in ("all", "2", "random")}
    assert extra["all"].batches == extra["2"].batches == extra["random"].batches
    assert extra["all"].batches - every.batches == pytest.approx(23_000 / mean / 16, abs=1)
    assert extra["all"].images - every.images == pytest.approx(23_000, abs=3)
    assert extra["2"].images - two.images == pytest.approx(23_000 * 2 / mean, abs=3)


def test_step_images_mean_and_most():
    """A breast-level step's images: the mean and the most over the drawn steps, per setting."""
    assert est.step_images(np.full(50, 2), "all", 8) == (16.0, 16, 16)
    views = np.array([2, 8])
    # four 8-view breasts meet in 20,000 steps; one of them makes a batch 8 slots wide
    assert est.step_images(views, "all", 4) == (20.0, 32, 32)
    assert est.step_images(views, "2", 4) == (8.0, 8, 8)
    mean, most, widest = est.step_images(views, "random", 4)
    assert mean == 12.0 and 20 < most <= 32 and widest == 32
    _, most, widest = est.step_images(views, "all", 4, steps=1, seed=3)
    assert most in range(8, 33, 6) and widest == (8 if most == 8 else 32)


def test_the_views_come_from_the_plans_table_when_at_hand(tmp_path):
    """A train.csv at hand gives the breasts' own view counts (here 3 a breast)."""
    rows = [dict(patient_id=p, laterality=lat, image_id=k, cancer=int(p == 0 and lat == "L"))
            for p in range(40) for lat in "LR" for k in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    s = est.estimate_training(dict(csv=str(tmp_path / "train.csv"), model="resnet18",
                                   size=[512, 256], batch_size=4, epochs=1, level="breast",
                                   min_positives=0, target_ratio=None, upsample=1.0),
                              "h200", memory=False)
    assert "3.00 views a breast" in s.note and "12.0 images a step on average" in s.note
    assert "memory for the most, 12, and the float input of the widest batch, 12 view slots" \
        in s.note and str(tmp_path / "train.csv") in s.note


@pytest.mark.heavy          # trains each model of the plan a few steps (about 20 s)
def test_calibrate_times_each_model_of_the_plan_here_and_estimates_from_it(capsys):
    """On the CPU at tiny sizes: every distinct model of the kaggle plan is trained a few steps
    on random input (loss finite), its rates printed and used in place of the anchors."""
    from rsna_utils.app.cli import main
    tiny = ["-p", "size=[64,32]", "-p", "batch_size=2", "-p", "min_positives=0", "-p",
            "workers=0", "-p", "device=cpu"]
    assert main(["notebooks", "--plan", "kaggle", "--calibrate", "--calibrate-steps", "2",
                 "--data", "/nonexistent", "--quiet", *tiny]) == 2      # a CPU: days
    assert "over its budget of 24 h; nothing was run" in capsys.readouterr().err
    assert main(["notebooks", "--plan", "kaggle", "--calibrate", "--calibrate-steps", "2",
                 "--data", "/nonexistent", "--quiet", "--budget-hours", "100000", *tiny]) == 0
    out = capsys.readouterr().out
    measured = [r for r in out.splitlines() if r.startswith("| ") and "| 64x32 | 2 |" in r]
    assert sorted(r.split("|")[1].strip() for r in measured) == [
        "convnext_small", "efficientnet_b2", "resnet18", "resnext50_32x4d"]
    for r in measured:
        assert float(r.split("|")[4]) > 0 and "| cpu |" in r
    assert out.count("measured here (--calibrate)") == 7       # every training step's time
    assert "plan kaggle:" in out


@pytest.mark.heavy          # runs backbones on the CPU (make test; not --fast)
def test_calibrate_step_honours_the_recipe_and_refuses_a_non_finite_loss():
    c = est.calibrate_step(dict(model="resnet18", size=[64, 32], batch_size=2, device="cpu",
                                csv="/nonexistent.csv", ema_epochs=0.5), steps=2, warmup=1)
    assert c.train_img_s > 0 and c.infer_img_s > 0 and c.peak_gib is None
    assert np.isfinite(c.first_loss) and np.isfinite(c.last_loss)
    with pytest.raises(RsnaError, match="the loss is not finite"):
        est.calibrate_step(dict(model="resnet18", size=[64, 32], batch_size=2, device="cpu",
                                csv="/nonexistent.csv", lr=1e30, warmup_epochs=0), steps=3,
                           warmup=1)


def test_optional_sources_are_skipped_with_one_line_or_stop_the_plan(tmp_path):
    from rsna_utils.app.notebooks import plan_steps
    said = []
    d, _, todo, _ = plan_steps("kaggle", tmp_path, runs=tmp_path / "runs",
                               external=tmp_path / "ext", say=said.append)
    assert d["sources"] is None and len(said) == 3                 # none here: RSNA alone
    assert said[0] == (f"source vindr: {tmp_path / 'ext' / 'vindr'} not found; skipped (train "
                       "without it; --require-sources stops instead)")
    train = [p for _, _, nb, p in todo if nb.name.startswith("03_")]
    assert all(p["csv"] == f"{tmp_path.absolute()}/train.csv" for p in train)
    with pytest.raises(RsnaError, match=r"source vindr: .*ext/vindr not found; ingest it there "
                                        r"\(`rsna ingest --format vindr"):
        plan_steps("kaggle", tmp_path, runs=tmp_path / "runs", external=tmp_path / "ext",
                   require_sources=True)
    # one source present: the mix is on, with its weight, and the other two are skipped
    (tmp_path / "ext" / "cmmd").mkdir(parents=True)
    said.clear()
    d, _, todo, _ = plan_steps("kaggle", tmp_path, runs=tmp_path / "runs",
                               external=tmp_path / "ext", say=said.append)
    assert [s["name"] for s in d["sources"]] == ["rsna", "cmmd"] and len(said) == 2
    train = [p for _, _, nb, p in todo if nb.name.startswith("03_")]
    assert all(p["extra"]["source_weights"] == {"rsna": 1.0, "cmmd": 0.5} for p in train)


def test_a_source_weight_of_zero_or_below_is_refused():
    from rsna_utils.sources.mix import check_plan_sources
    for w in (0, -1):
        with pytest.raises(RsnaError, match=f"p.yaml: source cmmd has weight {w}; a plan's "
                                            "source trains at a weight above 0"):
            check_plan_sources([{"name": "rsna", "dir": "x"},
                                {"name": "cmmd", "dir": "y", "weight": w}], "p.yaml")


def test_a_step_override_wins_over_an_every_step_one_in_any_order(tmp_path):
    from rsna_utils.app.notebooks import plan_steps
    for order in (["03_train_convnext_*.epochs=3", "epochs=1"],
                  ["epochs=1", "03_train_convnext_*.epochs=3"]):
        _, _, todo, _ = plan_steps("kaggle", tmp_path, runs=tmp_path / "runs", overrides=order,
                                   external=tmp_path, say=lambda m: None)
        epochs = {name: p["epochs"] for _, name, nb, p in todo if nb.name.startswith("03_")}
        assert epochs["03_train_convnext_2048x1024_fold2"] == 3, order
        assert epochs["03_train_resnet18_512x256_fold0"] == 1, order


def test_the_submit_plan_on_a_t4_x2_halves_the_models_time_not_the_reading(capsys):
    """Issue 41: `--gpu t4x2` (Kaggle's two T4s, the same 4 cores): the submit plan's `shards:
    auto` runs a process per GPU, so the models' time halves; reading the DICOMs does not
    (the cores read for both); `-p shards=1` is the one-T4 estimate. With the flip it fits in
    Kaggle's 9 h, as on one T4 it does not."""
    from rsna_utils.app.cli import main
    assert est.preprocess_img_s("t4x2") == est.preprocess_img_s("t4")
    assert est.inference_devices("auto", "t4x2") == 2 and est.inference_devices(1, "t4x2") == 1
    assert est.inference_devices("auto", "t4") == 1 and est.inference_devices(3, "t4x2") == 2
    hours, out = {}, ""
    for gpu, extra in (("t4", []), ("t4x2", []), ("t4x2", ["-p", "shards=1"])):
        assert main(["notebooks", "--plan", "submit", "--estimate", "--gpu", gpu, "--data",
                     "/nonexistent", "-p", "tta=true"] + extra) == 0
        out = capsys.readouterr().out
        row = next(r for r in out.splitlines() if r.startswith("| 04_inference"))
        assert ("on 2 GPUs (a process each)" in row) == (gpu == "t4x2" and not extra)
        hours[(gpu, bool(extra))] = float(row.split("|")[6])
    decode = 36_700 / est.preprocess_img_s("t4") / 3600
    one, two = hours[("t4", False)], hours[("t4x2", False)]
    assert two - decode == pytest.approx((one - decode) / 2, rel=0.01)
    assert hours[("t4x2", True)] == one
    assert two < 9 < one
    assert "hours on a T4 x2 (2 T4s)" in out and "each T4 at 0.067 of an H200" in out


def test_the_submit_plan_with_runtime_onnx_is_timed_as_pytorch_and_says_so(capsys):
    """No GPU figure of onnxruntime exists here (BENCHMARKS.md: CPU only): `-p runtime=onnx`
    is the eager PyTorch estimate, its row saying so, not a speed-up made up."""
    from rsna_utils.app.cli import main
    rows = {}
    for runtime in ("torch", "onnx"):
        assert main(["notebooks", "--plan", "submit", "--estimate", "--gpu", "t4", "--data",
                     "/nonexistent", "-p", f"runtime={runtime}"]) == 0
        out = capsys.readouterr().out
        rows[runtime] = next(r for r in out.splitlines() if r.startswith("| 04_inference"))
    assert "runtime onnx timed as eager PyTorch (not measured on a GPU)" in rows["onnx"]
    assert "runtime onnx" not in rows["torch"]
    assert float(rows["onnx"].split("|")[6]) == float(rows["torch"].split("|")[6])
