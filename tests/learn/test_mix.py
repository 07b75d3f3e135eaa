"""Training on a mix of sources (issue 31, part 3): the split validates on RSNA only and keeps
patients whole, source weights change what the sampler draws, bad values are one line, a plan's
sources are combined and weighted, and a mixed run of synthetic RSNA-shaped data and ingested
real CBIS-DDSM films preprocesses, trains and predicts end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.data import UpsampleSampler, epoch_indices, holdout_split, patient_folds
from rsna_utils.learn.train import make_split
from rsna_utils.learn.train_config import TrainConfig
from rsna_utils.learn import mix


def mixed_table(rsna_patients=40, cbis_patients=12, vindr_patients=10, seed=0) -> pd.DataFrame:
    """A train.csv of three sources: RSNA (sites 1 and 2, small ids), CBIS-DDSM (101) and VinDr
    (102) with ids in their ingest ranges; four images a patient, about one patient in four
    with a positive breast."""
    rng = np.random.default_rng(seed)
    rows = []
    for site_of, n, base in ((lambda p: 1 + p % 2, rsna_patients, 10_000),
                             (lambda p: 101, cbis_patients, 101 * 10**12),
                             (lambda p: 102, vindr_patients, 102 * 10**12)):
        for p in range(n):
            pid, sick = base + p, rng.random() < 0.25
            for k, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
                rows.append(dict(site_id=site_of(p), patient_id=pid, image_id=pid * 10 + k,
                                 laterality=lat, view=view, cancer=int(sick and lat == "L")))
    df = pd.DataFrame(rows)
    df["prediction_id"] = df.patient_id.astype(str) + "_" + df.laterality
    return df


def _cfg(tmp_path, **kw) -> TrainConfig:
    cfg = TrainConfig(**{"csv": "mixed.csv", "out": str(tmp_path / "run"), "progress": False,
                         **kw})
    Path(cfg.out).mkdir(parents=True, exist_ok=True)     # `train` makes it before the split
    return cfg


# ----------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------

def test_split_validates_on_rsna_only_and_keeps_each_patient_on_one_side(tmp_path, capsys):
    df = mixed_table()
    for kw in (dict(split="holdout", val_frac=0.3), dict(split="kfold", folds=4, fold=2)):
        cfg = _cfg(tmp_path, **kw)
        train, val = make_split(df, cfg, Path(cfg.out))
        assert set(val.site_id) <= {1, 2} and len(val) > 0 and val.cancer.sum() > 0
        assert not set(train.patient_id) & set(val.patient_id)
        # every CBIS-DDSM and VinDr image trains; splits.csv gives them fold -1
        assert (train.site_id > 100).sum() == (df.site_id > 100).sum()
        splits = pd.read_csv(Path(cfg.out) / "splits.csv").merge(df[["image_id", "site_id"]])
        assert (splits.loc[splits.site_id > 100, "fold"] == -1).all()
        assert (splits.loc[splits.site_id <= 2, "fold"] >= 0).all()
        assert splits.groupby("patient_id").fold.nunique().max() == 1
    # per source: one line printed each, and sources.csv with the same figures
    err = capsys.readouterr().out                  # the run's log goes to stdout
    assert "source rsna (site 1 2):" in err and "source cbis-ddsm (site 101):" in err
    assert "source vindr (site 102):" in err and "0 validation images" in err
    s = pd.read_csv(Path(cfg.out) / mix.SOURCES_FILE).set_index("source")
    assert list(s.index) == ["rsna", "cbis-ddsm", "vindr"]
    assert s.loc["cbis-ddsm", "train_images"] == 48 and s.loc["cbis-ddsm", "val_images"] == 0
    assert s.epoch_share.sum() == pytest.approx(1.0)
    # val_sites all: every source may be validated on, each stratified within its own patients
    cfg = _cfg(tmp_path, split="holdout", val_frac=0.3, val_sites="all", out=str(tmp_path / "all"))
    train, val = make_split(df, cfg, Path(cfg.out))
    assert set(val.site_id) == {1, 2, 101, 102} and not set(train.patient_id) & set(val.patient_id)


def test_a_table_of_one_source_or_without_sites_splits_exactly_as_before(tmp_path):
    rsna = mixed_table(cbis_patients=0, vindr_patients=0, seed=3)
    for table in (rsna, rsna.drop(columns="site_id")):
        for kw, legacy in ((dict(split="holdout", val_frac=0.25), holdout_split(table, 0.25, 42)),
                           (dict(split="kfold", folds=5), patient_folds(table, 5, 42))):
            cfg = _cfg(tmp_path, **kw, out=str(tmp_path / f"r{len(table.columns)}{kw['split']}"))
            make_split(table, cfg, Path(cfg.out))
            fold = pd.read_csv(Path(cfg.out) / "splits.csv").fold
            assert np.array_equal(fold.to_numpy(), legacy.to_numpy())
    assert not (tmp_path / "r6holdout" / mix.SOURCES_FILE).exists()     # no site_id: no table


# ----------------------------------------------------------------------------------------
# Source weights in the sampler
# ----------------------------------------------------------------------------------------

def _draws(labels, weights, epochs, **kw) -> np.ndarray:
    return np.stack([np.bincount(epoch_indices(labels, e, 7, weights=weights, **kw),
                                 minlength=len(labels)) for e in range(epochs)])


def test_source_names_are_the_sites_ingest_gives():
    from rsna_utils.sources.ingest import FORMATS
    assert mix.SOURCE_SITES == {"rsna": (1, 2), **{n: (f.site_id,) for n, f in FORMATS.items()}}
    assert [mix.source_name(s) for s in (1, 2, 101, 102, 103, 7)] == [
        "rsna", "rsna", "cbis-ddsm", "vindr", "cmmd", "site 7"]


def test_source_weights_change_the_expected_draws(tmp_path):
    df = mixed_table(rsna_patients=60, cbis_patients=40, vindr_patients=30)
    labels = df.cancer.to_numpy(np.float32)
    w = mix.row_weights(df, mix.parse_source_weights("cbis-ddsm=0.5,vindr=2"))
    cbis, vindr, rsna = (df.site_id == 101).to_numpy(), (df.site_id == 102).to_numpy(), \
        (df.site_id <= 2).to_numpy()
    assert set(w[cbis]) == {0.5} and set(w[vindr]) == {2.0} and set(w[rsna]) == {1.0}
    d = _draws(labels, w, 200)
    # 0.5: half of the source's negatives and of its positives, a fresh half each epoch
    for part in (cbis & (labels == 0), cbis & (labels == 1)):
        assert np.abs(d[:, part].sum(1) - part.sum() / 2).max() <= 1
    assert not np.array_equal(d[0, cbis], d[1, cbis])
    assert d[:, cbis].mean() == pytest.approx(0.5, abs=0.03)
    assert 0.3 < d[:, cbis].mean(0).min() and d[:, cbis].mean(0).max() < 0.7   # every image
    assert (d[:, vindr] == 2).all() and (d[:, rsna] == 1).all()
    # seeded: the same epoch draws the same images
    assert np.array_equal(epoch_indices(labels, 3, 7, weights=w), epoch_indices(labels, 3, 7,
                                                                                weights=w))
    # composed with the positives' upsampling: a CBIS positive 0.5 x 3, a VinDr one 2 x 3
    up = _draws(labels, w, 40, upsample=3.0)
    assert up[:, cbis & (labels == 1)].mean() == pytest.approx(1.5, abs=0.1)
    assert (up[:, vindr & (labels == 1)] == 6).all() and (up[:, rsna & (labels == 0)] == 1).all()
    # target_ratio holds in the weighted epoch
    r = epoch_indices(labels, 0, 7, target_ratio=0.4, weights=w)
    assert (labels[r] > 0.5).mean() == pytest.approx(0.4, abs=0.01)
    # no weights, or all 1: the sampler of before, draw for draw
    assert np.array_equal(epoch_indices(labels, 2, 7, 2.5), epoch_indices(labels, 2, 7, 2.5,
                                                                          weights=np.ones(len(w))))
    # a breast-level model's sampler draws breasts: each takes its views' source weight
    from types import SimpleNamespace
    breasts = SimpleNamespace(rows=[np.flatnonzero(rsna)[:2], np.flatnonzero(vindr)[:2]])
    w2 = mix.row_weights(df, {"vindr": 2.0})
    assert UpsampleSampler.item_weights(breasts, w2).tolist() == [1.0, 2.0]
    assert UpsampleSampler.item_weights(breasts, None) is None
    t = mix.source_table(df, df.iloc[:0], _cfg(tmp_path, level="breast", target_ratio=None,
                                                source_weights={"vindr": 2})).set_index("source")
    assert t.loc["vindr", "draws_per_epoch"] == 2 * df[vindr].prediction_id.nunique()
    # the per-source figures give the same expected draws
    cfg = _cfg(tmp_path, source_weights={"cbis-ddsm": 0.5, "vindr": 2}, target_ratio=None)
    t = mix.source_table(df, df.iloc[:0], cfg).set_index("source")
    assert t.loc["cbis-ddsm", "draws_per_epoch"] == pytest.approx(cbis.sum() / 2, abs=1)
    assert t.loc["vindr", "draws_per_epoch"] == 2 * vindr.sum()
    assert t.loc["rsna", "epoch_share"] == pytest.approx(rsna.sum() / (rsna.sum() + cbis.sum() / 2
                                                                      + 2 * vindr.sum()), abs=0.01)


def test_weighted_sampler_under_ddp_gives_each_rank_its_share():
    df = mixed_table(rsna_patients=20, cbis_patients=15, vindr_patients=5)
    labels = df.cancer.to_numpy(np.float32)
    w = mix.row_weights(df, {"cbis-ddsm": 0.5, "vindr": 0.0})
    for batch, minpos in ((1, 0), (4, 1)):
        ranks = [UpsampleSampler(labels, 5, 2.0, None, r, 2, batch, minpos, weights=w)
                 for r in range(2)]
        for epoch in range(4):
            for s in ranks:
                s.set_epoch(epoch)
            parts = [np.array(list(s)) for s in ranks]
            assert len(parts[0]) == len(parts[1]) == len(ranks[0])
            full = ranks[0]._indices()
            n = min(len(full), 2 * len(ranks[0]))
            both = np.empty(2 * len(ranks[0]), np.int64)
            both[0::2], both[1::2] = parts
            assert np.array_equal(both[:n], full[:n])           # the epoch, shared out
            assert not np.isin(np.flatnonzero(w == 0), both).any()   # weight 0: never drawn
            if minpos:
                for p in parts:
                    assert (labels[p.reshape(-1, batch)] > 0.5).any(1).all()


# ----------------------------------------------------------------------------------------
# Bad values: one line each, naming the value and the fix
# ----------------------------------------------------------------------------------------

def _one_line(match: str, fn, *a, **kw) -> str:
    with pytest.raises(RsnaError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_source_weights_and_val_sites_are_one_line_each(tmp_path, capsys):
    from rsna_utils.app.cli import build_parser
    _one_line(r"unknown source 'cbis'; use one of rsna, cbis-ddsm, vindr, cmmd", TrainConfig,
              source_weights={"cbis": 0.5})
    _one_line(r"weight '-1' of 'vindr': give a number >= 0", TrainConfig,
              source_weights="vindr=-1")
    _one_line(r"'vindr' is not source=weight; give source=weight pairs", TrainConfig,
              source_weights="vindr")
    _one_line(r"val_sites: 'rsnaa' is not a site id or a source name", TrainConfig,
              val_sites=["rsnaa"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--source-weights", "cmmd=x"])
    assert "weight 'x' of 'cmmd'" in capsys.readouterr().err
    a = build_parser().parse_args(["train", "--source-weights", "cmmd=0", "--val-sites", "rsna"])
    assert (a.source_weights, a.val_sites) == ({"cmmd": 0.0}, [1, 2])
    df = mixed_table()
    _one_line(r"val_sites=\[103\]: no image of mixed.csv comes from these sites \(it has sites "
              r"1, 2, 101, 102\); give some of those, or val_sites all", make_split, df,
              _cfg(tmp_path, val_sites=[103]), tmp_path)
    cbis_negative = df.assign(cancer=np.where(df.site_id == 101, 0, df.cancer))
    _one_line(r"val_sites=\[101\]: the 48 images of these sites in mixed.csv hold no positive",
              make_split, cbis_negative, _cfg(tmp_path, val_sites="cbis-ddsm"), tmp_path)
    _one_line(r"source_weights=.*mixed.csv has no site_id column.*drop source_weights",
              make_split, df.drop(columns="site_id"),
              _cfg(tmp_path, source_weights="cbis-ddsm=0.5"), tmp_path)
    _one_line(r"every training image has weight 0; give at least one source", make_split, df,
              _cfg(tmp_path, source_weights="rsna=0,cbis-ddsm=0,vindr=0"), tmp_path)
    _one_line(r"every positive training image has weight 0.*raise the weight", make_split,
              cbis_negative, _cfg(tmp_path, source_weights="rsna=0,vindr=0"), tmp_path)
    _one_line(r"add up to 0.5.*min_positives=1 needs one in every batch", make_split,
              df.assign(cancer=np.where(df.image_id == df[df.site_id == 101].image_id.iloc[0], 1,
                                        np.where(df.site_id == 101, 0, df.cancer))),
              _cfg(tmp_path, source_weights="rsna=0,vindr=0,cbis-ddsm=0.5", min_positives=1),
              tmp_path)


# ----------------------------------------------------------------------------------------
# Reports: per-source validation AUC
# ----------------------------------------------------------------------------------------

def test_the_run_report_shows_the_sources_and_their_validation_auc(tmp_path):
    from rsna_utils.reports import html
    df = mixed_table(seed=5)
    run = tmp_path / "plan" / "resnet18"
    run.mkdir(parents=True)
    cfg = _cfg(tmp_path, out=str(run), source_weights="cbis-ddsm=0.5", val_sites="all",
               split="holdout", val_frac=0.4)
    train, val = make_split(df, cfg, run)
    rng = np.random.default_rng(0)
    # a model that ranks RSNA's breasts perfectly and CBIS-DDSM's at random
    pred = np.where(val.site_id <= 2, val.cancer * 0.8 + 0.1, rng.random(len(val)))
    val.assign(prediction=pred).to_csv(run / "val_predictions.csv", index=False)
    t = mix.run_sources(run).set_index("source")
    assert t.loc["rsna", "val_breast_auc"] == 1.0
    assert t.loc["cbis-ddsm", "val_breast_auc"] < 1.0 and t.loc["cbis-ddsm", "weight"] == 0.5
    page = html.sources_section(tmp_path / "plan")
    assert "<h2>Sources</h2>" in page and "cbis-ddsm" in page and "validation breast AUC" in page
    (run / "val_predictions.csv").unlink()                # RSNA-only validation: no AUC column
    assert "val_breast_auc" not in mix.run_sources(run)
    assert html.sources_section(tmp_path / "nothing") == ""


# ----------------------------------------------------------------------------------------
# A plan's sources, and the mixed run end to end
# ----------------------------------------------------------------------------------------

def _plan(tmp_path, sources, steps=None) -> Path:
    p = tmp_path / "mixplan.yaml"
    p.write_text(json.dumps({"name": "mix", "sources": sources, "steps": steps or [
        {"notebook": "02_preprocessing_demo.ipynb",
         "parameters": {"images": "{train}/train_images", "csv_path": "{train}/train.csv",
                        "out": "{run_dir}/png", "size": [64, 32]}},
        {"notebook": "03_train.ipynb", "name": "03_train_resnet18",
         "parameters": {"data": "{run_dir}/png", "csv": "{train}/train.csv",
                        "out": "{run_dir}/resnet18", "extra": {"ema": 0.9}}}]}))
    return p


def test_a_plan_combines_its_sources_and_weights_the_training_steps(tmp_path, synth_small,
                                                                    cbis_out):  # noqa: F811
    from rsna_utils.app.notebooks import plan_steps, run_plan
    cbis = cbis_out[0]
    plan = _plan(tmp_path, [{"name": "rsna", "dir": "{data}"},
                            {"name": "cbis-ddsm", "images": str(cbis / "train_images"),
                             "csv": str(cbis / "train.csv"), "weight": 0.5}])
    d, run_dir, todo, _ = plan_steps(plan, data=synth_small, runs=tmp_path / "runs")
    mixed = (tmp_path / "runs" / "mix").resolve() / "sources"
    pre, tr = todo[0][3], todo[1][3]
    assert pre["csv_path"] == f"{mixed}/train.csv" and tr["csv"] == f"{mixed}/train.csv"
    assert tr["extra"] == {"ema": 0.9, "source_weights": {"rsna": 1.0, "cbis-ddsm": 0.5}}
    assert "extra" not in pre
    TrainConfig.from_dict(tr)                        # the step's settings are valid
    # the steps run after the sources are combined (here no step: only=[])
    run_plan(plan, data=synth_small, runs=tmp_path / "runs", only=["none"], progress=False)
    t = pd.read_csv(mixed / "train.csv")
    assert set(t.site_id) == {1, 2, 101} and (t.site_id == 101).sum() == 8
    assert all((mixed / "train_images" / str(p) / f"{i}.dcm").exists()
               for p, i in zip(t.patient_id, t.image_id))
    # unweighted sources weigh 1; without sources "{train}" is the data folder and no step
    # gets weights; bad source lists are one line
    d, _, todo, _ = plan_steps(_plan(tmp_path, [{"name": "rsna", "dir": "x"}, {"name": "vindr",
                                                                               "dir": "y"}]),
                               data=synth_small, runs=tmp_path / "runs")
    assert todo[1][3]["extra"]["source_weights"] == {"rsna": 1.0, "vindr": 1.0}
    _, _, todo, _ = plan_steps("demo", data=synth_small, runs=tmp_path / "runs")
    train_steps = [p for _, _, nb, p in todo if nb.name == "03_train.ipynb"]
    assert train_steps and all(p["csv"] == f"{Path(synth_small).absolute()}/train.csv"
                               and "source_weights" not in p.get("extra", {})
                               for p in train_steps)
    for bad, match in (([{"name": "rsna", "dir": "x"}], "two or more sources"),
                       ([{"name": "rsna", "dir": "x"}, {"name": "inbreast", "dir": "y"}],
                        "'inbreast' is not a source; use one of rsna, cbis-ddsm"),
                       ([{"name": "rsna", "dir": "x"}, {"name": "cmmd", "csv": "y"}],
                        "give either dir .* or both images and csv"),
                       ([{"name": "rsna", "dir": "x"}, {"name": "cmmd", "dir": "y",
                                                         "weight": -2}], "weight -2")):
        _one_line(match, plan_steps, _plan(tmp_path, bad), data=synth_small, runs=tmp_path)
    wrong = _plan(tmp_path, [{"name": "rsna", "dir": "{data}"},
                             {"name": "vindr", "dir": str(cbis)}])
    _one_line(r"source vindr: .*train.csv has site_id \[101\], not vindr's \[102\]", run_plan,
              wrong, data=synth_small, runs=tmp_path / "r2", only=["none"], progress=False)


@pytest.mark.heavy
def test_a_mixed_run_of_rsna_shaped_and_real_cbis_ddsm_files_trains_and_predicts(
        tmp_path, synth_small, cbis_out, capsys):  # noqa: F811
    """Synthetic RSNA-shaped patients and the ingested real CBIS-DDSM films combined,
    preprocessed, trained a few steps with CBIS-DDSM at weight 0.5 (validated on RSNA only),
    and the checkpoint predicts the synthetic test set: `rsna` commands, as a user runs them."""
    from rsna_utils.app.cli import main
    mixed, png, run = tmp_path / "mixed", tmp_path / "png", tmp_path / "run"
    assert main(["ingest", "--combine", str(synth_small), str(cbis_out[0]), "--out", str(mixed),
                 "--quiet"]) == 0
    assert main(["preprocess", "--images", str(mixed / "train_images"), "--csv",
                 str(mixed / "train.csv"), "--out", str(png), "--size", "64x32", "--workers",
                 "2", "--quiet"]) == 0
    t = pd.read_csv(mixed / "train.csv")
    assert len(list(png.glob("*.png"))) == len(t) and (t.site_id == 101).sum() == 8
    capsys.readouterr()
    assert main(["train", "--data", str(png), "--csv", str(mixed / "train.csv"), "--out",
                 str(run), "--model", "resnet18", "--size", "64x32", "--epochs", "1",
                 "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--device", "cpu",
                 "--val-frac", "0.3", "--source-weights", "cbis-ddsm=0.5", "--quiet"]) == 0
    err = capsys.readouterr().out                  # the run's log goes to stdout
    assert "source cbis-ddsm (site 101): 8 training images, 5 positive; weight 0.5: 4.0 draws" \
        in err, err
    # the sampler drew with the weights: 32 RSNA images + half of CBIS-DDSM's 8, not 40
    assert "of its 36 images)" in err, err
    s = pd.read_csv(run / mix.SOURCES_FILE).set_index("source")
    assert s.loc["cbis-ddsm", "val_images"] == 0 and s.loc["rsna", "val_images"] > 0
    val = pd.read_csv(run / "val_predictions.csv")
    assert set(val.site_id) <= {1, 2} and val.prediction.between(0, 1).all()
    assert json.loads((run / "config.json").read_text())["source_weights"] == {"cbis-ddsm": 0.5}
    sub = tmp_path / "submission.csv"
    assert main(["predict", "--images", str(synth_small / "test_images"), "--csv",
                 str(synth_small / "test.csv"), "--checkpoints", str(run / "best.pt"), "--out",
                 str(sub), "--sample-submission", str(synth_small / "sample_submission.csv"),
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    got, want = pd.read_csv(sub), pd.read_csv(synth_small / "sample_submission.csv")
    assert sorted(got.prediction_id) == sorted(want.prediction_id)
    assert got.cancer.between(0, 1).all()


@pytest.mark.heavy
def test_the_kaggle_plan_dry_runs_end_to_end_with_an_external_source_on(
        tmp_path, synth_small, cbis_out):  # noqa: F811
    """The winner-shaped kaggle plan at tiny sizes, every step, with the real CBIS-DDSM films
    under --external (vindr and cmmd absent: skipped with one line each): sources combined,
    preprocessed, seven training steps (ConvNeXt with max pooling, head dropout, the heavy
    augmentation, label smoothing), the 4-fold ensemble's out-of-fold threshold, a submission
    and the export, then the explain step."""
    import shutil

    from rsna_utils.app.notebooks import run_plan
    ext = tmp_path / "ext"
    ext.mkdir()
    shutil.copytree(cbis_out[0], ext / "cbis-ddsm", symlinks=True)
    tiny = ["size=[64,32]", "epochs=1", "max_steps=2", "batch_size=4", "min_positives=0",
            "workers=0", "device=cpu", "pretrained_path=null", "n_header_scan=20",
            "n_samples=2", "limit=2", "n_boot=20", "02_preprocessing_demo.workers=2"]
    res = run_plan("kaggle", data=synth_small, runs=tmp_path / "runs", overrides=tiny,
                   external=ext, weights=tmp_path / "no-weights", progress=False)
    run = Path(res["run_dir"])
    t = pd.read_csv(run / "sources" / "train.csv")
    assert set(t.site_id) == {1, 2, 101}                         # RSNA and CBIS-DDSM combined
    cfg = json.loads((run / "convnext_2048x1024_fold0" / "config.json").read_text())
    assert cfg["global_pool"] == "max" and cfg["head_dropout"] == 0.5
    assert cfg["aug_level"] == "heavy" and cfg["label_smoothing"] == 0.05
    assert cfg["source_weights"] == {"rsna": 1.0, "cbis-ddsm": 0.5}
    for fold in range(4):
        val = pd.read_csv(run / f"convnext_2048x1024_fold{fold}" / "val_predictions.csv")
        assert set(val.site_id) <= {1, 2}                         # validated on RSNA only
    ens = json.loads((run / "rsna-models" / "ensemble.json").read_text())
    assert len(ens["checkpoints"]) == 4
    sub = pd.read_csv(res["submission"])
    assert sub.cancer.isin([0, 1]).all() and len(sub) > 0
