"""`benchmarks/realdata.py` as an instrument (issue 37): its training settings are TrainConfig's,
its last-epoch model is the EMA where best.pt is, a steps budget gives two recipes the same
optimiser steps, and the paired out-of-fold comparison's arithmetic (CPU, seconds)."""
import importlib.util
import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from rsna_utils.learn.train_config import TrainConfig
from rsna_utils.reports.evaluate import compare_metric

_spec = importlib.util.spec_from_file_location("realdata_bench", REPO / "benchmarks" / "realdata.py")
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)


def settings(*argv, has_meta=False):
    a = rd.build_parser().parse_args(list(argv))
    return rd.train_settings(a, has_meta)


def config(*argv, tmp="/tmp/x", fold=0, folds=4, has_meta=False):
    s, _ = settings(*argv, has_meta=has_meta)
    return rd.run_config(s, data=tmp, csv=f"{tmp}/train.csv", out=f"{tmp}/run", split="kfold",
                         folds=folds, fold=fold)


# -- settings from TrainConfig ------------------------------------------------------------------

def test_every_train_config_field_is_a_flag_of_the_script():
    opts = {o for act in rd.build_parser()._actions for o in act.option_strings}
    for f in fields(TrainConfig):
        if f.metadata.get("cli", True):
            flag = f.metadata.get("negate") or "--" + f.name.replace("_", "-")
            assert flag in opts, f.name


def test_defaults_are_train_configs_unless_scale_or_the_recipe_says():
    cfg = config()                                  # recipe new, no flags
    default = TrainConfig()
    assert cfg.global_pool == default.global_pool == "gem"      # the script once said avg
    stated = set(rd.SCALE) | set(rd.RECIPES["new"]) | {"aux"} | set(rd.PER_RUN) | {"folds"}
    for k, v in asdict(cfg).items():
        if k not in stated:
            assert v == getattr(default, k), k
    for k, v in rd.RECIPES["new"].items():
        assert getattr(cfg, k) == TrainConfig(**{k: v}).__dict__[k], k
    assert cfg.model == rd.SCALE["model"] and cfg.epochs == rd.SCALE["epochs"]
    old = config("--recipe", "old")
    assert (old.upsample, old.pos_weight, old.ema_epochs) == (5.0, 5.0, 0.0)


def test_flags_and_yaml_override_the_recipe_in_order(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("lr: 0.001\nglobal_pool: max\nhead_dropout: 0.5\n")
    cfg = config("--config", str(y), "--global-pool", "avgmax", "--epochs", "3", "--size", "256x128")
    assert (cfg.lr, cfg.global_pool, cfg.head_dropout, cfg.epochs, cfg.size) == (
        0.001, "avgmax", 0.5, 3, [256, 128])
    # a fixed --ema replaces the recipe's ema_epochs (TrainConfig refuses both)
    cfg = config("--ema", "0.99")
    assert (cfg.ema, cfg.ema_epochs) == (0.99, 0.0)
    # aux: AUX with the metadata table, none: off; a breast-level run drops view, halves the batch
    assert config(has_meta=True).aux == rd.AUX.split(",")
    assert config("--aux", "none", has_meta=True).aux == []
    b = config("--level", "breast", has_meta=True)
    assert "view" not in b.aux and b.batch_size == 8
    # the old spellings still work
    s, predict_tta = settings("--no-tta", "--val-tta", "true", "--pretrained", "none.pth")
    assert (predict_tta, s["tta"], s["pretrained_path"]) == (False, True, "none.pth")


def test_per_run_fields_and_bad_values_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--out: this script sets it"):
        settings("--out", "somewhere")
    y = tmp_path / "t.yaml"
    y.write_text("nope: 1\n")
    with pytest.raises(SystemExit, match="unknown training option"):
        settings("--config", str(y))
    with pytest.raises(SystemExit, match="drop_path"):
        config("--drop-path", "1.5")


def test_a_finished_run_is_reused_only_with_the_same_train_config():
    want = asdict(config())
    stored = {k: v for k, v in want.items() if k not in ("head_dropout", "label_smoothing")}
    stored["size"] = "x".join(str(v) for v in want["size"])      # config.json of an older run
    stored["out"] = "elsewhere"
    assert rd.config_differences(stored, want) == {}
    stored["global_pool"] = "avg"
    assert rd.config_differences(stored, want) == {"global_pool": ("avg", "gem")}


# -- last.pt with EMA ---------------------------------------------------------------------------

def test_ema_epochs_counts_as_ema():
    assert rd.uses_ema({"ema": 0.0, "ema_epochs": 0.5})
    assert rd.uses_ema({"ema": 0.999, "ema_epochs": 0.0})
    assert not rd.uses_ema({"ema": 0.0, "ema_epochs": 0.0})
    assert rd.uses_ema(asdict(config()))                      # recipe new: ema_epochs 0.5
    assert not rd.uses_ema(asdict(config("--recipe", "old")))


def _last_pt(run: Path, **cfg):
    import torch
    from torch.optim.swa_utils import AveragedModel

    from rsna_utils.learn.checkpoint import save_checkpoint
    run.mkdir()
    live = torch.nn.Linear(3, 1)
    ema = AveragedModel(live, use_buffers=True)
    with torch.no_grad():
        live.weight.add_(1.0)                      # the live network moved on from the average
    save_checkpoint({"model": live.state_dict(), "ema": ema.state_dict(), "epoch": 3,
                     "optimizer": {}, "model_name": "x"}, run / "last.pt")
    (run / "config.json").write_text(json.dumps({"ema": 0.0, "ema_epochs": 0.0, **cfg}))
    return live, ema


def test_the_last_model_scored_is_the_average_with_ema_epochs(tmp_path):
    from rsna_utils.learn.checkpoint import read_checkpoint
    live, ema = _last_pt(tmp_path / "ema", ema_epochs=0.5)
    got = rd.last_scored(tmp_path / "ema")
    assert got.name == "last_ema.pt"
    ck = read_checkpoint(got)
    assert set(ck["model"]) == set(live.state_dict()) and "ema" not in ck and "optimizer" not in ck
    assert np.allclose(ck["model"]["weight"].numpy(), ema.module.weight.detach().numpy())
    assert not np.allclose(ck["model"]["weight"].numpy(), live.weight.detach().numpy())
    _last_pt(tmp_path / "plain")
    assert rd.last_scored(tmp_path / "plain") == tmp_path / "plain" / "last.pt"


# -- equal optimiser steps ----------------------------------------------------------------------

def _table(n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        cancer = int(rng.random() < 0.3)
        for side in "LR":
            for view in ("CC", "MLO"):
                rows.append(dict(site_id=1, patient_id=p, laterality=side, view=view, cancer=cancer if side == "L" else 0))
    df = pd.DataFrame(rows)
    df["image_id"] = np.arange(len(df))
    df["prediction_id"] = df.patient_id.astype(str) + "_" + df.laterality
    return df


def _taken(budget, batches, accumulate=1):
    """Optimiser steps the training loop takes under the budget (train_one_epoch's rule)."""
    per = min(batches, budget["max_steps"] or 10**9) // accumulate
    return budget["epochs"] * per


def test_a_steps_budget_gives_two_recipes_of_different_epochs_the_same_steps(tmp_path):
    table = _table()
    old, new = (config("--recipe", r, tmp=str(tmp_path)) for r in ("old", "new"))
    b_old, b_new = rd.epoch_batches(old, table), rd.epoch_batches(new, table)
    assert b_old > 1.5 * b_new                        # upsample 5 makes the longer epoch
    for steps in (60, 120, 240, 97, 250):
        po, pn = rd.steps_budget(steps, b_old), rd.steps_budget(steps, b_new)
        assert _taken(po, b_old) == po["total"] and _taken(pn, b_new) == pn["total"]
        if steps not in (97, 250):      # no epoch count near enough divides these: rounded up
            assert po["total"] == pn["total"] == steps, steps
        for p in (po, pn):
            assert steps <= p["total"] < steps + p["epochs"], steps
    # applied to the configs: the two runs' epochs and max_steps differ, their steps do not
    co, cn = rd.with_steps(old, 120, table), rd.with_steps(new, 120, table)
    assert (co.epochs, co.max_steps) != (cn.epochs, cn.max_steps)
    assert _taken(dict(epochs=co.epochs, max_steps=co.max_steps), b_old) == \
        _taken(dict(epochs=cn.epochs, max_steps=cn.max_steps), b_new) == 120


def test_steps_budget_arithmetic():
    assert rd.steps_budget(100, 30) == dict(epochs=4, max_steps=25, per_epoch=25, total=100,
                                            full_epoch=30)
    assert rd.steps_budget(60, 30) == dict(epochs=2, max_steps=None, per_epoch=30, total=60,
                                           full_epoch=30)
    b = rd.steps_budget(40, 30, accumulate=2)        # 15 optimiser steps an epoch
    assert _taken(b, 30, 2) == 40 and b["max_steps"] % 2 == 0
    with pytest.raises(SystemExit, match="--steps 0"):
        rd.steps_budget(0, 30)


def test_steps_taken_reads_the_images_seen(tmp_path):
    pd.DataFrame({"epoch": [0, 1], "train_images": [400, 392]}).to_csv(tmp_path / "metrics.csv")
    assert rd.steps_taken(tmp_path, 16) == 25 + 25


# -- the paired comparison ----------------------------------------------------------------------

def _breasts(n=80, seeds=2, seed=1):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 0).astype(int)
    patients = np.repeat(np.arange(n // 2), 2)
    a = np.stack([y * 0.3 + rng.random(n) for _ in range(seeds)], 1)
    b = np.stack([y * 0.6 + rng.random(n) for _ in range(seeds)], 1)
    return y, a, b, patients


def test_paired_difference_of_one_seed_is_the_projects_paired_bootstrap():
    y, a, b, pid = _breasts(seeds=1)
    r = rd.paired_difference(y, a, b, pid, n_boot=300, seed=3)
    ref = compare_metric(y, a[:, 0], b[:, 0], pid, "auc", n_boot=300, seed=3)
    for k in ("a", "b", "difference", "difference_low", "difference_high", "p_not_better"):
        assert r[k] == pytest.approx(ref[k]), k
    assert r["resolution"] == pytest.approx((ref["difference_high"] - ref["difference_low"]) / 2)
    assert r["difference_low"] < r["difference"] < r["difference_high"]
    assert r["se"] > 0 and r["breasts"] == 80 and r["positive_breasts"] == 20


def test_paired_difference_over_seeds_is_the_mean_of_the_seeds_differences():
    from rsna_utils.learn.metrics import roc_auc
    y, a, b, pid = _breasts(seeds=2)
    r = rd.paired_difference(y, a, b, pid, n_boot=300)
    each = [roc_auc(y, b[:, j]) - roc_auc(y, a[:, j]) for j in range(2)]
    assert r["difference"] == pytest.approx(np.mean(each))
    assert r["seeds"] == 2 and len(r["a_by_seed"]) == 2
    # two seeds average out part of the noise: never a wider interval than the noisier seed's
    one = [rd.paired_difference(y, a[:, [j]], b[:, [j]], pid, n_boot=300)["resolution"]
           for j in range(2)]
    assert r["resolution"] <= max(one) + 1e-9
    same = rd.paired_difference(y, a, a, pid, n_boot=100)
    assert same["difference"] == same["resolution"] == 0.0
    with pytest.raises(SystemExit, match="seed"):
        rd.paired_difference(y, a, b[:, :1], pid)


def test_runs_are_paired_by_breast_not_by_row_order():
    y, a, b, pid = _breasts(seeds=2)
    ids = [f"{p}_{'LR'[i % 2]}" for i, p in enumerate(pid)]
    other = pd.DataFrame({"prediction_id": ids, "cancer": y, "patient_id": pid,
                          "best_s42": a[:, 0], "best_s43": a[:, 1]})
    this = pd.DataFrame({"prediction_id": ids, "cancer": y, "patient_id": pid,
                         "best_s42": b[:, 0], "best_s43": b[:, 1]})
    ref = rd.paired_difference(*rd.pair_runs(this, other, "best"), n_boot=200)
    shuffled = this.sample(frac=1, random_state=0)
    got = rd.paired_difference(*rd.pair_runs(shuffled, other, "best"), n_boot=200)
    assert got["difference"] == pytest.approx(ref["difference"])
    assert got["resolution"] == pytest.approx(ref["resolution"])
    assert ref["difference"] == pytest.approx(
        rd.paired_difference(y, a, b, pid, n_boot=200)["difference"])
    with pytest.raises(SystemExit, match="seed"):
        rd.pair_runs(this.drop(columns="best_s43"), other, "best")
    with pytest.raises(SystemExit, match="breasts in common"):
        rd.pair_runs(this.head(40), other, "best")


def test_oof_breasts_average_the_views():
    img = pd.DataFrame({"prediction_id": ["1_L", "1_L", "2_R"], "cancer": [1, 1, 0],
                        "best_s42": [0.2, 0.6, 0.1], "last_s42": [0.0, 1.0, 0.3]})
    b = rd.oof_breasts(img, ("best_s42", "last_s42")).set_index("prediction_id")
    assert b.loc["1_L", "best_s42"] == pytest.approx(0.4) and b.loc["1_L", "last_s42"] == 0.5
    assert b.loc["2_R", "cancer"] == 0 and b.loc["1_L", "patient_id"] == "1"


def _oof_folder(root: Path, name: str, ids, y, pid, seed: int, scores) -> Path:
    d = root / name
    d.mkdir(parents=True)
    pd.DataFrame({"prediction_id": ids, "cancer": y, "patient_id": pid,
                  f"best_s{seed}": scores, f"last_s{seed}": scores[::-1].copy()}).to_csv(
        d / "oof_breasts.csv", index=False)
    return d


def test_runs_of_separate_seeds_pool_into_one_paired_comparison(tmp_path, monkeypatch, capsys):
    """--pool / --versus-pool: two invocations of one seed each (seeds 43 and 44, as sessions run
    them) give the figures one --seeds 2 run would: the mean of the seeds' differences, paired
    by breast and seed, whatever the row order of each file."""
    y, a, b, pid = _breasts(seeds=2)
    ids = [f"{p}_{'LR'[i % 2]}" for i, p in enumerate(pid)]
    order = np.random.default_rng(0).permutation(len(y))
    new = [_oof_folder(tmp_path, f"new{s}", ids, y, pid, s, a[:, j]) for j, s in enumerate((43, 44))]
    win = [_oof_folder(tmp_path, f"win{s}", [ids[i] for i in order], y[order], pid[order], s,
                       b[order, j]) for j, s in enumerate((43, 44))]
    this, other = rd.pool_runs(win), rd.pool_runs(new)
    assert rd.seed_columns(this, "best") == ["best_s43", "best_s44"] and len(this) == len(y)
    got = rd.paired_difference(*rd.pair_runs(this, other, "best"), n_boot=200)
    ref = rd.paired_difference(y, a, b, pid, n_boot=200)
    assert got["difference"] == pytest.approx(ref["difference"]) and got["seeds"] == 2
    assert got["resolution"] == pytest.approx(ref["resolution"])
    # the command: printed and written (here under tmp_path, not the repository's results)
    monkeypatch.setattr(rd, "REPO", tmp_path)
    assert rd.main(["--pool", *map(str, win), "--versus-pool", *map(str, new),
                    "--n-boot", "200", "--tag", "_t"]) == 0
    out = capsys.readouterr().out
    assert "seeds 43, 44" in out and f"{ref['difference']:+.3f}" in out
    saved = json.loads((tmp_path / "benchmarks" / "results").glob("*_pooled_t.json").__next__().read_text())
    assert saved["versus"]["best_auc"]["difference"] == pytest.approx(ref["difference"])
    # refused: a seed twice, a pairing of other seeds, folders of other breasts
    with pytest.raises(SystemExit, match="best_s43 is in .* pool runs of different seeds"):
        rd.pool_runs([new[0], win[0]])
    with pytest.raises(SystemExit, match=r"2 seed\(s\) of best there, 1 here"):
        rd.pair_runs(rd.pool_runs(win[:1]), other, "best")
    with pytest.raises(SystemExit, match="seeds 44 there, 43 here"):
        rd.pair_runs(rd.pool_runs(win[:1]), rd.pool_runs(new[1:]), "best")
    half = _oof_folder(tmp_path, "half", ids[:40], y[:40], pid[:40], 45, a[:40, 0])
    with pytest.raises(SystemExit, match="shares only 40 of 80 breasts"):
        rd.pool_runs([new[0], half])
    with pytest.raises(SystemExit, match="--versus-pool: with --pool only"):
        rd.main(["--versus-pool", str(new[0])])
