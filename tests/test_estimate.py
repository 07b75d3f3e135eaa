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
                                        r"\['convnext_small'"):
        est.throughput("vit_huge", (512, 512))


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
    want = 2 * (e.images / (tr * est.FROM_PNG) + 54_706 / 4 * 2 / (inf * est.FROM_PNG)) / 3600
    assert e.hours == pytest.approx(want, rel=0.01)
    # a train.csv at hand is read: half positive, no sampler
    pd.DataFrame({"cancer": np.r_[np.ones(50), np.zeros(50)].astype(int)}).to_csv(
        tmp_path / "train.csv", index=False)
    e2 = est.estimate_training({**params, "csv": str(tmp_path / "train.csv"), "target_ratio": None,
                                "min_positives": 0}, "h200", memory=False)
    assert 60 <= e2.images <= 90 and str(tmp_path / "train.csv") in e2.note


def test_the_kaggle_plan_fits_one_80_gb_gpu_and_says_its_time(capsys):
    from rsna_utils.app.cli import main
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| 03_train")]
    assert len(rows) == 13 and any("convnext_small 2048x1024" in r for r in rows)
    mems = [float(r.split("|")[7]) for r in rows]
    assert max(mems) < 0.9 * 80 and "(over!)" not in out
    total = float(out.split("**all**")[1].split("**")[1])
    assert 20 < total < 100                    # hours on one H100, stated
    assert "one H100 at 0.85 of an H200 (an assumption" in out


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


def test_the_submit_plan_on_kaggles_t4_decodes_once_and_says_its_assumptions(capsys):
    """The submit plan (no training steps) is timed with the kaggle plan's exported models on
    the hidden test set's 32,000 images: decoding once (the T4 box's 4 cores), then every
    checkpoint at its own ceiling, twice with the flip."""
    from rsna_utils.app.cli import main
    assert est.preprocess_img_s("t4") == pytest.approx(min(42.5 * 4 / 16, 193.2 / 15))
    assert est.preprocess_img_s("h200") == pytest.approx(42.5)
    hours = {}
    for flip in ("true", "false"):
        assert main(["notebooks", "--plan", "submit", "--estimate", "--gpu", "t4", "--data",
                     "/nonexistent", "-p", f"tta={flip}"]) == 0
        out = capsys.readouterr().out
        row = next(r for r in out.splitlines() if r.startswith("| 04_inference"))
        assert "12 checkpoints" in row and "| 32,000 |" in row
        hours[flip] = float(row.split("|")[6])
        assert "one T4 at 0.067 of an H200" in out and "DICOM reading at 10.6 img/s" in out
    decode = 32_000 / est.preprocess_img_s("t4") / 3600
    assert hours["true"] - decode == pytest.approx(2 * (hours["false"] - decode), rel=0.01)


def test_a_plan_step_the_estimate_refuses_is_named(capsys):
    from rsna_utils.app.cli import main
    assert main(["notebooks", "--plan", "kaggle", "--estimate", "--data", "/nonexistent", "-p",
                 "03_train_resnext50_1024x512_fold0.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "plan step 03_train_resnext50_1024x512_fold0: target_ratio=0.125 cannot be met" in err


def test_a_breast_level_step_reads_two_views_per_item(tmp_path):
    """level breast: the sampler's epoch is in breasts, each read as two views; at equal batch
    the step holds twice the images (memory), the epoch the same views as the image model's."""
    params = dict(csv=str(tmp_path / "absent.csv"), model="resnet18", size=[512, 256],
                  batch_size=32, epochs=1, split="kfold", folds=4, upsample=1.0,
                  target_ratio=None, min_positives=0, tta=False)
    img = est.estimate_training(params, "h200", memory=True)
    brs = est.estimate_training({**params, "level": "breast", "batch_size": 16}, "h200", memory=True)
    assert "per breast" in brs.note and "breasts" in brs.what
    assert brs.images == pytest.approx(img.images, rel=0.01)      # the same views an epoch
    assert brs.batches == pytest.approx(img.batches, rel=0.02)    # 16 breasts = 32 views a step
    assert brs.hours == pytest.approx(img.hours, rel=0.02)
    assert brs.memory_gib == pytest.approx(img.memory_gib, rel=0.01)
    doubled = est.estimate_training({**params, "level": "breast"}, "h200", memory=True)
    assert doubled.memory_gib > 1.5 * img.memory_gib
