import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.learn.data import (
    UpsampleSampler,
    batches_with_positives,
    check_split,
    epoch_indices,
    holdout_split,
    load_table,
    patient_folds,
)
from rsna_utils.learn.models import WeightedBCE, create_model
from rsna_utils.learn.train import TrainConfig, train
from rsna_utils.learn.weights import load_weights


def test_weighted_bce_is_the_formula_and_stable():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0, 4.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    p = torch.sigmoid(x)
    expected = -(5 * y * torch.log(p) + 2 * (1 - y) * torch.log(1 - p)).mean()
    assert WeightedBCE(5, 2)(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(5.0))(x, y)
    assert WeightedBCE(5, 1)(x, y).item() == pytest.approx(ref.item(), rel=1e-5)
    big = WeightedBCE(5, 1)(torch.tensor([-200.0, 200.0]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(big) and big.item() == pytest.approx(0.5 * (5 * 200 + 200))
    with pytest.raises(RsnaError):
        WeightedBCE(0, 1)


def test_upsampling_factor_and_ratio():
    labels = np.array([1] * 10 + [0] * 90)
    idx = epoch_indices(labels, epoch=0, seed=1, upsample=5)
    assert (labels[idx] == 1).sum() == 50 and (labels[idx] == 0).sum() == 90
    assert not np.array_equal(idx, epoch_indices(labels, epoch=1, seed=1, upsample=5))
    assert np.array_equal(idx, epoch_indices(labels, epoch=0, seed=1, upsample=5))
    r = epoch_indices(labels, 0, 1, target_ratio=0.5)
    assert abs((labels[r] == 1).mean() - 0.5) < 0.02


def test_distributed_sampler_keeps_upsampling():
    labels = np.array([1] * 7 + [0] * 60)
    s0 = UpsampleSampler(labels, seed=3, upsample=4, rank=0, world_size=2)
    s1 = UpsampleSampler(labels, seed=3, upsample=4, rank=1, world_size=2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == len(s0)
    full = epoch_indices(labels, 0, 3, 4)
    pad = len(a) + len(b) - len(full)
    assert 0 <= pad < 2
    # together the two ranks see exactly the upsampled epoch (plus padding), each index once
    assert sorted(a + b) == sorted(list(full) + list(full[:pad]))
    assert (labels[a + b] == 1).sum() >= 28


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_batch_holds_a_positive(world):
    """min_positives: each rank's every batch has that many positives, however few there are
    (2% here, like the real data: without it most batches of 8 have none)."""
    labels = np.array([1] * 4 + [0] * 196)
    batch = 8
    plain = epoch_indices(labels, 0, seed=5, upsample=2)
    assert sum((labels[plain[i:i + batch]] == 0).all() for i in range(0, len(plain), batch)) > 10
    lengths = set()
    for epoch in range(3):
        for r in range(world):
            s = UpsampleSampler(labels, 5, 2, None, r, world, batch, 1)
            s.set_epoch(epoch)
            got = list(s)
            assert len(got) == len(s) and len(got) % batch == 0
            lengths.add(len(got))
            for i in range(0, len(got), batch):
                assert (labels[got[i:i + batch]] == 1).sum() >= 1, (epoch, r, i)
        # every negative of the epoch is still seen once or more
        s = UpsampleSampler(labels, 5, 2, None, 0, world, batch, 1)
        s.set_epoch(epoch)
        seen = set(s._indices().tolist())
        assert set(np.flatnonzero(labels == 0).tolist()) <= seen
    assert len(lengths) == 1          # the same number of steps every epoch (the schedule's)
    a = batches_with_positives(plain, labels, batch, 1, seed=5, epoch=0)
    assert np.array_equal(a, batches_with_positives(plain, labels, batch, 1, seed=5, epoch=0))
    assert not np.array_equal(a, batches_with_positives(plain, labels, batch, 1, seed=5, epoch=1))
    assert batches_with_positives(plain, labels, batch, 0, 5, 0) is plain


def test_min_positives_bad_values():
    labels = np.array([0] * 20)
    with pytest.raises(RsnaError, match="no positive"):
        batches_with_positives(np.arange(20), labels, 8, 1, 0, 0)
    with pytest.raises(RsnaError, match="below batch_size=4"):
        batches_with_positives(np.arange(20), labels, 4, 4, 0, 0)
    with pytest.raises(RsnaError, match="min_positives=16: must be below batch_size=16"):
        TrainConfig(min_positives=16, batch_size=16)


def test_patient_grouped_splits():
    rng = np.random.default_rng(0)
    pats = np.repeat(np.arange(60), 4)
    cancer = np.repeat(rng.random(60) < 0.3, 4).astype(int)
    df = pd.DataFrame({"patient_id": pats, "image_id": np.arange(240), "cancer": cancer})
    folds = patient_folds(df, 4, seed=1)
    assert (df.assign(f=folds).groupby("patient_id").f.nunique() == 1).all()
    for k in range(4):
        assert df.cancer[folds == k].sum() > 0
    h = holdout_split(df, 0.15, seed=1)
    share = df.assign(h=h).groupby("patient_id").h.first().mean()
    assert 0.1 < share < 0.2
    with pytest.raises(RsnaError, match="no positive images"):
        check_split(df[df.cancer == 0], df[df.cancer == 1], "test")


def test_models_one_logit_and_bad_names(tmp_path):
    m = create_model("resnet18", in_chans=1)
    assert m(torch.rand(2, 1, 64, 64)).shape == (2, 1)
    with pytest.raises(RsnaError, match="unknown model 'resnet1800'"):
        create_model("resnet1800")


def test_pretrained_from_local_file_only(tmp_path):
    from safetensors.torch import save_file
    src = create_model("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    for f in ("r18.pth", "r18.safetensors"):
        m = create_model("resnet18", pretrained_path=tmp_path / f)
        assert torch.equal(m.conv1.weight, src.conv1.weight)
    one = create_model("resnet18", in_chans=1, pretrained_path=tmp_path / "r18.pth")
    assert torch.allclose(one.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    torch.save(create_model("efficientnet_b0").state_dict(), tmp_path / "b0.pth")
    with pytest.raises(RsnaError, match="another architecture"):
        create_model("resnet18", pretrained_path=tmp_path / "b0.pth")
    with pytest.raises(RsnaError, match="not found"):
        create_model("resnet18", pretrained_path=tmp_path / "nope.pth")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    e = _Exploit()
    e.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": e}, f)
    with pytest.raises(RsnaError, match="refused"):
        load_weights(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(RsnaError, match="unreadable checkpoint"):
        load_weights(tmp_path / "garbage.pt")


@pytest.fixture(scope="module")
def png48(tmp_path_factory, synth_small):
    out = tmp_path_factory.mktemp("png48")
    Preprocessor(PreprocessConfig(size=48), workers=2, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", out)
    return out


def _cfg(tmp_path, png48, synth_small, **kw):
    d = dict(data=str(png48), csv=str(synth_small / "train.csv"), out=str(tmp_path / "run"),
             model="resnet18", size=48, epochs=1, batch_size=8, workers=0, device="cpu",
             max_steps=3, progress=False, val_frac=0.3)
    d.update(kw)
    return TrainConfig(**d)


def test_train_writes_checkpoints_metrics_and_resumes(tmp_path, png48, synth_small, monkeypatch):
    best = train(_cfg(tmp_path, png48, synth_small))
    run = tmp_path / "run"
    for f in ("best.pt", "last.pt", "metrics.csv", "metrics.json", "splits.csv", "config.json",
              "val_predictions.csv"):
        assert (run / f).exists(), f
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["model_name"] == "resnet18" and ck["preprocess"]["size"] == [48, 48]
    assert 0 <= ck["threshold"] <= 1 and "breast_mean_pf1" in best["metrics"]
    splits = pd.read_csv(run / "splits.csv")
    assert (splits.groupby("patient_id").fold.nunique() == 1).all()
    # resumed with another input normalisation (e.g. --pretrained-path forgotten): refused,
    # nothing trained on
    import rsna_utils.learn.checkpoint as train_mod  # the model contract's normalisation
    real_norm = train_mod._input_norm
    monkeypatch.setattr(train_mod, "_input_norm", lambda *a: ((0.1, 0.1, 0.1), (0.2, 0.2, 0.2)))
    with pytest.raises(RsnaError, match=r"last.pt: trained on other inputs \{'norm': .*\(last.pt, "
                                        r"this run\): the input mean / std .*same --pretrained-path"):
        train(_cfg(tmp_path, png48, synth_small, epochs=2, resume=True))
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [0]
    monkeypatch.setattr(train_mod, "_input_norm", real_norm)
    real_pre = train_mod._preprocess_config
    monkeypatch.setattr(train_mod, "_preprocess_config", lambda d: {**real_pre(d), "margin": 0.25})
    with pytest.raises(RsnaError, match=r"trained on other inputs \{'margin': \(0.0, 0.25\)\}.*"
                                        r"same --data folder"):
        train(_cfg(tmp_path, png48, synth_small, epochs=2, resume=True))
    # PNGs of another size (progressive resizing) continue the run, also from a last.pt written
    # before a preprocessing setting existed (`preprocess.LATER_SETTINGS`)
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["preprocess"].pop("inverted") == "warn"
    torch.save(last, run / "last.pt")
    monkeypatch.setattr(train_mod, "_preprocess_config", lambda d: {**real_pre(d), "size": [96, 96]})
    train(_cfg(tmp_path, png48, synth_small, epochs=2, resume=True))
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [0, 1]
    assert not list(run.glob(".*tmp*"))


def test_train_bad_inputs(tmp_path, png48, synth_small):
    with pytest.raises(RsnaError, match="unknown model"):
        train(_cfg(tmp_path, png48, synth_small, model="resnet_nope"))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "last.pt").write_bytes(b"corrupt")
    with pytest.raises(RsnaError, match="unreadable checkpoint"):
        train(_cfg(tmp_path, png48, synth_small, resume=True))
    csv = pd.read_csv(synth_small / "train.csv")
    csv.loc[0, "image_id"] = 1
    csv.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(RsnaError, match="PNG.*missing"):
        load_table(tmp_path / "bad.csv", png48)
    pd.read_csv(synth_small / "train.csv").assign(cancer=0).to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(RsnaError, match="no positive images"):
        train(_cfg(tmp_path, png48, synth_small, csv=str(tmp_path / "neg.csv"), out=str(tmp_path / "r2")))


def _free_port() -> int:
    """A port nothing listens on now (a fixed one can still be held by a run moments before)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cmd: list, env: dict) -> subprocess.CompletedProcess:
    """Run a torchrun command; once more on a fresh port when gloo's TCP transport dropped a
    connection (a known flake of gloo on a loaded machine, pytorch/pytorch#53270), so a bug of
    ours, which fails both times, still fails the test. A failure shows each rank's own lines
    first: the launcher's summary alone hides the cause."""
    for attempt in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode == 0 or attempt == 2 or "gloo/transport" not in r.stderr:
            break
        import warnings
        warnings.warn("torchrun: gloo dropped a connection; run again on a fresh port:\n"
                      + r.stderr[-1500:])
        i = cmd.index("--master_port") + 1
        cmd = cmd[:i] + [str(_free_port())] + cmd[i + 1:]
    ranks = "\n".join(ln for ln in r.stderr.splitlines() if "[rank" in ln or "Error" in ln)
    assert r.returncode == 0, ranks[-4000:] + "\n---\n" + r.stderr[-2000:]
    return r


def test_ddp_two_processes_gloo_identical_weights(tmp_path, png48, synth_small):
    env = dict(os.environ, RSNA_WRITE_RANK_DIGEST="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "rsna_utils", "train", "--data", str(png48),
           "--csv", str(synth_small / "train.csv"), "--out", str(tmp_path / "ddp"),
           "--model", "resnet18", "--size", "48", "--epochs", "1", "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--max-steps", "3", "--min-positives", "1",
           "--quiet"]
    r = _torchrun(cmd, env)
    d0 = (tmp_path / "ddp" / "weights_rank0.txt").read_text()
    d1 = (tmp_path / "ddp" / "weights_rank1.txt").read_text()
    assert d0 == d1
    assert len(pd.read_csv(tmp_path / "ddp" / "metrics.csv")) == 1
    # validation shared: rank 0 scored half, and the gathered predictions are those of best.pt
    # on every validation image, in order
    val = pd.read_csv(tmp_path / "ddp" / "val_predictions.csv")
    assert f"validation shared by 2 ranks: rank 0 scored {(len(val) + 1) // 2} of {len(val)}" in r.stderr
    assert val.prediction.notna().all()
    from rsna_utils.infer.predict import load_models
    from rsna_utils.learn.data import PngDataset
    from rsna_utils.learn.train import predict_loader
    (m,), _ = load_models([tmp_path / "ddp" / "best.pt"], torch.device("cpu"))
    ds = PngDataset(val.assign(png=[str(png48 / f"{p}_{i}.png") for p, i in
                                    zip(val.patient_id, val.image_id)]), m.size, 3, norm=m.norm)
    again = predict_loader(m.model, torch.utils.data.DataLoader(ds, 8), torch.device("cpu"),
                           norm=m.norm)
    np.testing.assert_allclose(val.prediction.to_numpy(), again, rtol=1e-4, atol=1e-6)
    # splits.csv is written once (rank 0; two ranks renaming one temporary raced) and whole
    assert len(pd.read_csv(tmp_path / "ddp" / "splits.csv")) == len(pd.read_csv(synth_small / "train.csv"))
    assert not list((tmp_path / "ddp").glob(".*.tmp*"))


def test_yaml_config_and_cli_errors(tmp_path, png48, synth_small):
    (tmp_path / "t.yaml").write_text(f"data: {png48}\ncsv: {synth_small / 'train.csv'}\nmodel: resnet18\nsize: 48\nepochs: 3\n")
    cfg = TrainConfig.from_yaml(tmp_path / "t.yaml", epochs=1, out=str(tmp_path / "o"))
    assert cfg.epochs == 1 and cfg.size == [48, 48] and cfg.model == "resnet18"
    (tmp_path / "bad.yaml").write_text("modle: resnet18\n")
    with pytest.raises(RsnaError, match="unknown training option.*modle"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "train", "--config", str(tmp_path / "t.yaml"),
                        "--model", "resnet_nope", "--out", str(tmp_path / "o2"), "--device", "cpu",
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("rsna train: error: unknown model 'resnet_nope'")


def test_auxiliary_targets_train_and_predict(tmp_path, synth_small):
    """Aux heads on the metadata: the model has 1 + K logits, inference reads logit 0, and a
    missing column is refused with one line before anything is written."""
    import pandas as pd
    import pytest

    from rsna_utils.core.errors import RsnaError
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.infer.predict import predict
    from rsna_utils.learn.data import aux_targets
    from rsna_utils.learn.train import TrainConfig, train
    df = pd.read_csv(synth_small / "train.csv")
    t = aux_targets(df, ["view", "density", "age", "biopsy"])
    assert t.shape == (len(df), 4) and set(np.unique(t[:, 0][~np.isnan(t[:, 0])])) <= {0.0, 1.0}
    assert np.nanmax(t) <= 1 and np.nanmin(t) >= 0
    png = tmp_path / "png"
    Preprocessor(PreprocessConfig(size=(64, 32)), workers=1, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", png)
    cfg = dict(data=str(png), csv=str(synth_small / "train.csv"), size="64x32", epochs=1,
               max_steps=2, workers=0, progress=False, val_frac=0.3, batch_size=4)
    with pytest.raises(RsnaError, match="no 'shoe_size'|shoe_size"):
        train(TrainConfig(out=str(tmp_path / "bad"), aux=["shoe_size"], **cfg))
    assert not (tmp_path / "bad" / "best.pt").exists()
    train(TrainConfig(out=str(tmp_path / "run"), aux=["view", "density", "age"], **cfg))
    import torch
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ck["aux"] == ["view", "density", "age"] and ck["size"] == [64, 32]
    r = predict(synth_small / "test_images", synth_small / "test.csv", [tmp_path / "run" / "best.pt"],
                tmp_path / "sub.csv", workers=0, progress=False)
    assert r.submission.cancer.between(0, 1).all()


def test_ema_warmup_decay():
    from rsna_utils.learn.train import ema_decay
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)       # the first blends follow the model
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.99, 10_000) == 0.99                    # then the asked decay
    assert ema_decay(0.5, 20) == 0.5 and ema_decay(0.5, 5) == pytest.approx(6 / 15)


def test_ema_of_a_run_averages_batchnorm_buffers_with_the_warmup():
    """The EMA that train() builds (create_optimisation): BatchNorm running statistics are
    averaged, not frozen at the start, and each update uses the decay of its own count."""
    from rsna_utils.learn.train import create_optimisation, ema_decay
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = create_optimisation(TrainConfig(ema=0.9, device="cpu"), net, 10, torch.device("cpu")).ema
    ema.update_parameters(net)                                 # n=0: a copy of the start
    bn, ebn = net[1], ema.module[1]
    expect = ebn.running_mean.clone()
    net.train()
    for n in (1, 2):
        net(torch.randn(4, 1, 8, 8) + 3.0 * n)                 # moves the live running mean
        ema.update_parameters(net)
        d = ema_decay(0.9, n)
        expect = d * expect + (1 - d) * bn.running_mean
        assert torch.allclose(ebn.running_mean, expect), n
    assert not torch.allclose(ebn.running_mean, bn.running_mean)
    assert int(ebn.num_batches_tracked) == int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("pool,aux", [("gem", 0), ("avg", 2)])
def test_backbone_lr_splits_head_and_backbone(pool, aux):
    """backbone_lr 0.1: the classifier (widened for aux targets) and GeM's p at lr, every other
    parameter at lr/10, each exactly once; the warmup/cosine schedule scales both alike."""
    from rsna_utils.learn.models import create_model, set_outputs
    from rsna_utils.learn.train import create_optimisation
    net = create_model("resnet18", 3, None, global_pool=pool)
    if aux:
        set_outputs(net, 1 + aux)
    cfg = TrainConfig(lr=1e-3, backbone_lr=0.1, epochs=2, warmup_epochs=0, device="cpu",
                      global_pool=pool)
    opt = create_optimisation(cfg, net, 10, torch.device("cpu")).optimizer
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    head = groups["head"]["params"] + groups["head_no_decay"]["params"]
    for n, lr in (("head", 1e-3), ("head_no_decay", 1e-3), ("backbone", 1e-4),
                  ("backbone_no_decay", 1e-4)):
        assert groups[n]["lr"] == pytest.approx(lr), n
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())       # all, none twice
    want = {id(net.fc.weight), id(net.fc.bias)} | ({id(net.global_pool.p)}
                                                   if pool == "gem" else set())
    assert {id(p) for p in head} == want
    assert net.fc.out_features == 1 + aux
    one = create_optimisation(TrainConfig(lr=1e-3, device="cpu"), net, 10,
                              torch.device("cpu")).optimizer
    assert [g["name"] for g in one.param_groups] == ["all", "all_no_decay"]
    assert all(g["initial_lr"] == pytest.approx(1e-3) for g in one.param_groups)


def test_weight_decay_spares_norms_biases_and_gem():
    """Decoupled weight decay on conv and linear weights only; BatchNorm scales and shifts,
    biases and GeM's p keep theirs (a step with zero gradient leaves them as they were)."""
    from rsna_utils.learn.models import create_model
    from rsna_utils.learn.train import create_optimisation
    net = create_model("resnet18", 3, None, global_pool="gem")
    cfg = TrainConfig(lr=1e-2, weight_decay=0.05, epochs=1, warmup_epochs=0, device="cpu")
    opt = create_optimisation(cfg, net, 10, torch.device("cpu")).optimizer
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.ndim > 1), n                 # only >1-D weights shrink
    assert not torch.equal(net.conv1.weight, before["conv1.weight"])
    assert torch.equal(net.bn1.weight, before["bn1.weight"])
    assert torch.equal(net.global_pool.p, before["global_pool.p"])


def test_backbone_lr_out_of_range_is_refused():
    from rsna_utils.core.errors import RsnaError
    for bad in (0, 1.5):
        with pytest.raises(RsnaError, match="backbone_lr"):
            TrainConfig(backbone_lr=bad)


def test_tta_validation_averages_the_flip(tmp_path, png48, synth_small):
    """tta=True: the same training (same seed, same weights), and val_predictions.csv holds the
    mean of best.pt's plain and horizontally flipped prediction of each validation PNG."""
    import cv2

    from rsna_utils.learn.data import model_input
    from rsna_utils.learn.models import create_model
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "plain")))
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "tta"), tta=True))
    plain = pd.read_csv(tmp_path / "plain" / "val_predictions.csv")
    flip = pd.read_csv(tmp_path / "tta" / "val_predictions.csv")
    assert list(plain.image_id) == list(flip.image_id)
    assert not np.allclose(plain.prediction, flip.prediction, atol=1e-4)

    ck = torch.load(tmp_path / "tta" / "best.pt", weights_only=True)
    net = create_model("resnet18", 3, None, global_pool="gem").eval()
    net.load_state_dict(ck["model"])
    x = torch.stack([model_input(cv2.imread(p, cv2.IMREAD_UNCHANGED), ck["size"],
                                 [tuple(v) for v in ck["norm"]]) for p in flip.png])
    with torch.no_grad():
        one = torch.sigmoid(net(x)[:, 0]).numpy()
        mirrored = torch.sigmoid(net(torch.flip(x, dims=[3]))[:, 0]).numpy()
    assert np.allclose(plain.prediction, one, atol=1e-4)        # the same best.pt, unflipped
    assert np.allclose(flip.prediction, (one + mirrored) / 2, atol=1e-4)
    # the flip changes no weight: both runs end with the same parameters
    ck0 = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    ck1 = torch.load(tmp_path / "tta" / "last.pt", weights_only=True)
    assert all(torch.equal(ck0["model"][k], ck1["model"][k]) for k in ck0["model"])


def _killed_after_epoch_0(monkeypatch, cfg) -> None:
    """train(cfg) stopped right after epoch 0's checkpoint, as if killed there."""
    import rsna_utils.learn.train as tr

    class Stop(Exception):
        pass
    real_save = tr.save_epoch

    def save_then_stop(*a, **k):
        real_save(*a, **k)
        raise Stop
    monkeypatch.setattr(tr, "save_epoch", save_then_stop)
    with pytest.raises(Stop):
        train(cfg)
    monkeypatch.setattr(tr, "save_epoch", real_save)


def test_resume_restores_the_live_model_and_the_ema_apart(tmp_path, png48, synth_small,
                                                        monkeypatch):
    """An EMA run stopped after epoch 0 and resumed ends with the same live weights and the same
    EMA as the run done in one go; last.pt keeps the two apart."""
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "once"), epochs=2, ema=0.9))
    _killed_after_epoch_0(monkeypatch, _cfg(tmp_path, png48, synth_small,
                                            out=str(tmp_path / "twice"), epochs=2, ema=0.9))
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "twice"), epochs=2, ema=0.9,
               resume=True))
    a = torch.load(tmp_path / "once" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "twice" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    live = a["model"]
    avg = {k.removeprefix("module."): v for k, v in a["ema"].items() if k.startswith("module.")}
    assert any(not torch.allclose(live[k].float(), avg[k].float()) for k in live)
    for k in live:
        assert torch.allclose(live[k].float(), b["model"][k].float(), atol=1e-5), k
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k].float(), b["ema"][k].float(), atol=1e-5), k


def test_a_two_group_run_resumes_and_refuses_other_group_settings(tmp_path, png48, synth_small,
                                                                 monkeypatch):
    """backbone_lr 0.1 stopped after epoch 0 and resumed: the same weights as in one go, and the
    backbone's lr logged; resuming with another backbone_lr or tta is refused with the flag."""
    from rsna_utils.core.errors import RsnaError
    kw = dict(epochs=2, backbone_lr=0.1)
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "once"), **kw))
    _killed_after_epoch_0(monkeypatch, _cfg(tmp_path, png48, synth_small,
                                            out=str(tmp_path / "twice"), **kw))
    for bad, flag in (({"backbone_lr": 0.5}, "--backbone-lr 0.1"), ({"tta": True}, "--tta false")):
        with pytest.raises(RsnaError, match=f"last.pt: trained with .*resume with {flag}"):
            train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "twice"),
                       **{**kw, **bad, "resume": True}))
    train(_cfg(tmp_path, png48, synth_small, out=str(tmp_path / "twice"), resume=True, **kw))
    a = torch.load(tmp_path / "once" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "twice" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    h = pd.read_csv(tmp_path / "twice" / "metrics.csv")
    assert np.allclose(h.lr_backbone, h.lr * 0.1)


def test_half_precision_is_fp16_on_a_t4_and_bf16_from_ampere(monkeypatch, capsys):
    """A T4 / P100 (Kaggle) has no native bf16; torch.cuda.is_bf16_supported() still says yes
    there (emulation), so the choice reads the compute capability, and says so once."""
    import torch

    from rsna_utils.core import errors as errors_mod
    from rsna_utils.learn.device import half_dtype
    from rsna_utils.learn.train import amp_dtype
    monkeypatch.setattr(errors_mod, "_SAID", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    cuda = torch.device("cuda", 0)
    for major, want in ((6, torch.float16), (7, torch.float16), (8, torch.bfloat16),
                        (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: (m, 0))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert half_dtype(cuda) is want
        assert amp_dtype(TrainConfig(amp="auto"), cuda) is want
        assert amp_dtype(TrainConfig(amp="fp16"), cuda) is torch.float16
    assert half_dtype(torch.device("cpu")) is None
    assert amp_dtype(TrainConfig(amp="auto"), torch.device("cpu")) is None
    err = capsys.readouterr().err
    assert err.count("Tesla T4 (compute capability 6.0) has no native bf16: mixed precision "
                     "runs in fp16") == 1
    assert err.count("compute capability 7.0") == 1 and "8.0" not in err


def test_a_size_a_fixed_size_backbone_cannot_take_fails_before_anything_is_written(
        tmp_path, png48, synth_small):
    """DeiT is built for 224x224: a 2:1 input is one clear line, before the split is written."""
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(png48), csv=str(synth_small / "train.csv"), out=str(out),
                      model="deit_tiny_patch16_224", global_pool="avg", size="64x32",
                      epochs=1, workers=0,
                      device="cpu", progress=False)
    with pytest.raises(RsnaError, match=r"'deit_tiny_patch16_224' cannot take the input size "
                                        r"64x32 .*use --size 224x224"):
        train(cfg)
    assert not (out / "splits.csv").exists() and not (out / "config.json").exists()


def test_train_names_a_wrong_csv_or_folder_before_anything_else(tmp_path, capsys):
    """Before: the random-weights notice came first and the run folder was made, then the
    missing CSV was named."""
    from rsna_utils.app.cli import main
    png = tmp_path / "png"
    png.mkdir()
    for data, csv, what in ((tmp_path / "nope", tmp_path / "t.csv", "nope: PNG folder not found"),
                            (png, tmp_path / "nope.csv", "nope.csv: CSV not found")):
        code = main(["train", "--data", str(data), "--csv", str(csv), "--out",
                     str(tmp_path / "run"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and what in err and err.count("\n") == 1, err
        assert "random weights" not in err and not (tmp_path / "run").exists()


def test_select_window_picks_by_the_mean_of_the_last_epochs():
    """One lucky epoch (0.80 after 0.55) wins alone; with a window of 2 the steadier pair
    (0.70, 0.72) wins over (0.55, 0.80)."""
    from rsna_utils.learn.train import update_best
    aucs = [0.70, 0.72, 0.55, 0.80]
    hist, best1, best2 = [], None, None
    for e, a in enumerate(aucs):
        m = {"breast_mean_auc": a, "breast_mean_pr_auc": 0.1}
        hist.append(m)
        best1, _ = update_best(best1, m, e, "auc")
        best2, _ = update_best(best2, m, e, "auc", hist, window=2)
    assert best1["epoch"] == 3
    assert best2["epoch"] == 1 and best2["score"][0] == pytest.approx(0.71)
    assert best2["window"] == 2 and best2["select_by"] == "auc"
    # a lucky first epoch is not judged on itself alone: it waits for a full window
    from rsna_utils.learn.train import full_window
    cfg = TrainConfig(select_window=3, epochs=4)
    hist, best = [], None
    for e, a in enumerate([0.90, 0.60, 0.62, 0.70]):
        hist.append({"breast_mean_auc": a})
        best, improved = update_best(best, hist[-1], e, "auc", hist, 3, full_window(cfg, hist))
        assert improved == (e == 2)            # eligible from epoch 2 on; epoch 3's mean 0.64
    assert best["epoch"] == 2 and best["score"][0] == pytest.approx((0.9 + 0.6 + 0.62) / 3)
    assert full_window(TrainConfig(select_window=3, epochs=2), hist[:2])   # a shorter run
    assert full_window(TrainConfig(), hist[:1])


def test_a_tie_goes_to_the_later_epoch():
    """A saturated validation (breast AUC and PR-AUC 1.000 after each epoch, as on the
    synthetic check of issue 37 item 6) keeps the later, longer-trained epoch, not the first;
    a lower later epoch still loses, and a windowed tie also goes to the later epoch."""
    from rsna_utils.learn.train import update_best
    best = None
    for e, a in enumerate([1.0, 1.0]):
        best, improved = update_best(best, {"breast_mean_auc": a, "breast_mean_pr_auc": 1.0}, e,
                                     "auc")
        assert improved
    assert best["epoch"] == 1
    best, improved = update_best(best, {"breast_mean_auc": 0.99, "breast_mean_pr_auc": 1.0}, 2,
                                 "auc")
    assert not improved and best["epoch"] == 1
    hist, best = [], None
    for e in range(3):
        hist.append({"breast_mean_auc": 1.0, "breast_mean_pr_auc": 1.0})
        best, _ = update_best(best, hist[-1], e, "auc", hist, window=2)
    assert best["epoch"] == 2


def test_ema_decay_from_epochs_fits_the_steps_per_epoch():
    from rsna_utils.learn.train import create_optimisation, ema_decay, ema_from_epochs
    assert ema_from_epochs(1, 5000) == pytest.approx(0.9998)
    assert ema_from_epochs(0.5, 80) == pytest.approx(0.975)
    assert ema_from_epochs(0.5, 1) == 0.0                     # never below one step
    net = torch.nn.Linear(3, 1)
    cfg = TrainConfig(ema_epochs=0.5, device="cpu", epochs=1)
    ema = create_optimisation(cfg, net, 80, torch.device("cpu")).ema
    with torch.no_grad():
        ema.module.weight.fill_(0.0)
        net.weight.fill_(1.0)
    ema.n_averaged.fill_(10_000)          # past the warm-up: one blend at the set decay
    ema.update_parameters(net)
    assert ema.module.weight.flatten()[0].item() == pytest.approx(1 - 0.975)
    assert ema_decay(0.975, 10_000) == pytest.approx(0.975)
    assert create_optimisation(TrainConfig(device="cpu"), net, 80, torch.device("cpu")).ema is None


def test_sampler_ratio_settings_are_checked():
    from rsna_utils.core.errors import RsnaError
    assert TrainConfig(target_ratio="1:7").target_ratio == pytest.approx(0.125)
    with pytest.raises(RsnaError, match=r"target_ratio='2:0'.*give a share in \(0, 1\) or POS:NEG"):
        TrainConfig(target_ratio="2:0")
    from rsna_utils.learn.data import check_ratio
    rare = np.r_[np.ones(2), np.zeros(98)]                 # 2% positive, as the competition
    with pytest.raises(RsnaError, match=r"cannot be met with min_positives=1 in a batch of 4: "
                                        r"at least 25% .*\(the data has 2.0%\); raise batch_size to 8"):
        check_ratio(rare, 0.125, 1, 4)
    check_ratio(rare, 0.125, 1, 8)                         # one in 8: the ratio itself
    check_ratio(rare, 0.125, 0, 4)                         # no per-batch rule
    check_ratio(np.r_[np.ones(30), np.zeros(70)], 0.125, 1, 4)   # richer than the ratio
    check_ratio(rare, 0.125, 1, 4, upsample=5.0)           # upsample: the ratio is not used
    with pytest.raises(RsnaError, match="ema=0.99 and ema_epochs=1.0: give one"):
        TrainConfig(ema=0.99, ema_epochs=1.0)
    from rsna_utils.app.cli import build_parser
    assert build_parser().parse_args(["train", "--target-ratio", "1:7"]).target_ratio == 0.125
    assert build_parser().parse_args(["train", "--target-ratio", "none"]).target_ratio is None
    with pytest.raises(SystemExit) as e:           # one line, not a traceback
        build_parser().parse_args(["train", "--target-ratio", "3:0"])
    assert e.value.code == 2


def test_compile_switch_runs_the_training_forward_through_torch_compile(tmp_path, png48,
                                                                         synth_small, monkeypatch):
    """--compile: the loop calls the compiled module (torch.compile stubbed here: no C++
    toolchain needed), while the checkpoints keep the plain model's weights."""
    calls = []

    class Compiled(torch.nn.Module):           # what torch.compile returns: a module wrapper
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.inner(x)

    def fake_compile(module):
        return Compiled(module)
    monkeypatch.setattr(torch, "compile", fake_compile)
    train(_cfg(tmp_path, png48, synth_small, compile=True, max_steps=2))
    assert len(calls) == 2 and calls[0][1:] == (3, 48, 48)
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ck["model"])
    calls.clear()
    train(_cfg(tmp_path / "b", png48, synth_small, max_steps=2))
    assert not calls
