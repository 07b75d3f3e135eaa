"""The breast-level model (`--level breast`): attention over the views with a missing view
masked, its dataset, training, checkpoints and inference that pool each breast's views."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.learn.breast import (
    BreastDataset,
    breast_scores,
    collate_breasts,
    create_breast_model,
    view_present,
)
from rsna_utils.learn.data import load_table
from rsna_utils.learn.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    m = create_breast_model("resnet18", 3, global_pool="gem").eval()
    # a trained-looking attention: the initial one (std 0.01) is nearly uniform
    for lin in (m.attention_v, m.attention_u, m.attention_w, m.head):
        torch.nn.init.normal_(lin.weight, std=0.5)
    return m


def test_a_missing_view_is_masked_not_scored_as_a_blank_image(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 3, 64, 48)
    x[1, 1] = -2.0                       # breast 1: its MLO slot empty (a constant input)
    with torch.no_grad():
        out = tiny_model(x)
        w = tiny_model.last_attention
        alone = tiny_model(x[1:2, :1])   # the same breast read with its one view only
        swapped = tiny_model(x.flip(1))  # the views in the other order
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert w[1, 1] == 0 and w[1, 0] == 1
    assert (w[[0, 2]] > 0).all() and not torch.allclose(w[0], torch.full((2,), 0.5))
    assert torch.allclose(out[1], alone[0], atol=1e-5)
    assert torch.allclose(out, swapped, atol=1e-5)          # pooling ignores the order
    # had the blank slot been scored, the breast's output would differ
    x2 = x.clone()
    x2[1, 1] = torch.randn(3, 64, 48)
    with torch.no_grad():
        assert not torch.allclose(tiny_model(x2)[1], out[1], atol=1e-3)
    assert view_present(x).tolist() == [[True, True], [True, False], [True, True]]


def test_a_blank_slot_made_by_the_training_input_is_masked_under_imagenet_norm(tiny_model):
    """The blank slot as training makes it: zeros (uint8) through the device input with
    ImageNet's per-channel mean / std, three different constants; masked all the same, and the
    backbone reads only the views present (its BatchNorm statistics never see a blank)."""
    from rsna_utils.learn.data import NO_INTENSITY, device_input
    from rsna_utils.learn.models import input_norm
    from rsna_utils.learn.train import _to_device
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(1, 255, (2, 2, 1, 64, 48), generator=g, dtype=torch.uint8)
    raw[0, 1] = 0                                    # breast 0: one view
    params = torch.from_numpy(NO_INTENSITY).expand(2, 2, 3)
    x = _to_device((raw, params), torch.device("cpu"), input_norm("resnet18"), 3, True, device_input)
    assert x.shape == (2, 2, 3, 64, 48)
    assert view_present(x).tolist() == [[True, False], [True, True]]
    seen = []
    hook = tiny_model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    try:
        with torch.no_grad():
            out = tiny_model(x)
            w = tiny_model.last_attention.clone()
            alone = tiny_model(x[:1, :1])
    finally:
        hook.remove()
    assert seen[0] == 3                              # 3 views present of 4 slots
    assert torch.allclose(out[0], alone[0], atol=1e-5)
    assert w[0].tolist() == [1.0, 0.0]


def test_features_then_pool_is_the_forward_and_breast_scores_pool_each_breast(tiny_model):
    torch.manual_seed(2)
    x = torch.randn(2, 2, 3, 64, 48)
    with torch.no_grad():
        direct = torch.sigmoid(tiny_model(x)[:, 0]).numpy()
        feats = tiny_model.features(x.flatten(0, 1)).numpy()
    # rows: breast A's two views, then breast B's, interleaved with an unread view of B
    rows = np.stack([feats[0], feats[2], feats[1], feats[3], feats[3]])
    pid = ["A", "B", "A", "B", "B"]
    readable = np.array([True, True, True, True, False])
    prob, att = breast_scores(tiny_model, rows, readable, pid, "cpu")
    assert np.allclose(prob[[0, 2]], direct[0], atol=1e-5)
    assert np.allclose(prob[[1, 3]], direct[1], atol=1e-5)
    assert np.isnan(prob[4]) and np.isnan(att[4])
    assert np.isclose(att[0] + att[2], 1) and np.isclose(att[1] + att[3], 1)


def test_another_architecture_or_a_non_linear_head_names_both():
    import timm

    from rsna_utils.learn.breast import drop_classifier
    m = timm.create_model("resnet18", pretrained=False, num_classes=1)
    m.fc = torch.nn.Sequential(torch.nn.Linear(512, 1))
    with pytest.raises(RsnaError, match="Sequential, not a linear layer"):
        drop_classifier(m)
    with pytest.raises(RsnaError, match="aux target 'view' is per image"):
        TrainConfig(level="breast", aux=["view"])


@pytest.fixture(scope="module")
def png48b(tmp_path_factory, synth_small):
    out = tmp_path_factory.mktemp("png48b")
    Preprocessor(PreprocessConfig(size=48), workers=2, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", out)
    return out


def test_breast_dataset_reads_a_cc_and_an_mlo_per_breast(png48b, synth_small):
    df = load_table(synth_small / "train.csv", png48b)
    one = df.drop(df.index[(df.prediction_id == df.prediction_id.iloc[0]) & (df.view == "MLO")])
    ds = BreastDataset(one, (48, 48), aux=["age", "BIRADS"])
    assert len(ds) == one.prediction_id.nunique()
    truth = one.groupby("prediction_id", sort=False).cancer.max().to_numpy()
    assert np.array_equal(ds.labels, truth)
    (raw, params), y = ds[0]
    assert raw.shape == (1, 1, 48, 48) and params.shape == (1, 3) and y.shape == (3,)
    (raw, params), _ = collate_breasts([ds[0], ds[1]])
    assert raw.shape == (2, 2, 1, 48, 48) and params.shape == (2, 2, 3)
    assert raw[0, 0].amax() > 0 and raw[0, 1].amax() == 0   # its MLO dropped: an empty slot
    (raw, _), _ = ds[1]
    rows = ds.rows[1]
    assert sorted(one.view.to_numpy()[rows]) == ["CC", "MLO"]
    assert (raw.flatten(1).amax(1) > 0).all()
    vals = ds.image_values(np.arange(len(ds), dtype=np.float32), len(one))
    assert (pd.Series(vals).groupby(one.prediction_id.to_numpy()).nunique() == 1).all()


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory, png48b, synth_small):
    root = tmp_path_factory.mktemp("breast")
    image = TrainConfig(data=str(png48b), csv=str(synth_small / "train.csv"), out=str(root / "img"),
                        model="resnet18", size=48, epochs=1, batch_size=8, workers=0,
                        device="cpu", max_steps=2, progress=False, val_frac=0.3)
    train(image)
    cfg = TrainConfig(**{**dataclasses.asdict(image), "out": str(root / "breast"), "level": "breast",
                         "batch_size": 4, "pretrained_path": str(root / "img" / "best.pt"),
                         "aux": ["age"], "tta": True})
    best = train(cfg)
    return root, best


def test_training_reads_all_views_two_or_a_random_number(png48b, synth_small):
    """breast_views (issue 41): training read a CC and an MLO per breast while validation and
    inference pool every view; "all" (now the default) trains on what inference sees, "2" on
    a CC and an MLO, "random" on 1 to all. An item holds the views read, no padding."""
    from rsna_utils.learn.data import Augment
    df = load_table(synth_small / "train.csv", png48b)
    ids = list(dict.fromkeys(df.prediction_id))
    first = df[df.prediction_id == ids[0]]
    table = pd.concat([first, first.iloc[:1], df[df.prediction_id == ids[1]]])   # 3 views, 2
    aug = Augment.level("light")

    def read(ds, b):
        (raw, _), _ = ds[b]
        return raw.shape[0], int((raw.flatten(1).amax(1) > 0).sum())

    two = BreastDataset(table, (48, 48), augment=aug, views="2")
    assert read(two, 0) == (2, 2) and two.views_read().tolist() == [2, 2]
    every = BreastDataset(table, (48, 48), augment=aug)
    assert TrainConfig().breast_views == "all" and every.views == 3
    assert read(every, 0) == (3, 3) and read(every, 1) == (2, 2)    # no padding in the item
    assert every.views_read().tolist() == [3, 2]
    rnd = BreastDataset(table, (48, 48), augment=aug, views="random")
    seen = set()
    for _ in range(30):
        seen.add(read(rnd, 0))
    assert seen == {(1, 1), (2, 2), (3, 3)} and rnd.views_read().tolist() == [2, 1.5]
    assert read(BreastDataset(table, (48, 48), views="random"), 0) == (3, 3)  # validation: all
    with pytest.raises(RsnaError, match="breast views 'some': give a number of views >= 1, all "
                                        "or random"):
        BreastDataset(table, (48, 48), views="some")
    with pytest.raises(RsnaError, match="breast_views"):
        TrainConfig(data=str(png48b), csv=str(synth_small / "train.csv"), level="breast",
                    breast_views="3")


def test_a_batch_is_padded_to_its_own_most_views_not_the_tables(png48b, synth_small):
    """collate_breasts: a breast of 3 views beside one of 2 makes a batch 3 views wide, the
    missing slot zeros with no intensity change (masked by the model); a batch of 2-view
    breasts stays 2 wide although the table holds a 3-view breast (before, every item was
    padded to the table's most: up to 8 views a breast on RSNA)."""
    import torch

    from rsna_utils.learn.augment import NO_INTENSITY
    df = load_table(synth_small / "train.csv", png48b)
    ids = list(dict.fromkeys(df.prediction_id))
    first = df[df.prediction_id == ids[0]]
    table = pd.concat([first, first.iloc[:1]] + [df[df.prediction_id == i] for i in ids[1:3]])
    ds = BreastDataset(table, (48, 48))
    (raw, params), y = collate_breasts([ds[0], ds[1]])
    assert raw.shape == (2, 3, 1, 48, 48) and params.shape == (2, 3, 3) and y.shape == (2,)
    assert not raw[1, 2].any() and torch.equal(params[1, 2], torch.from_numpy(NO_INTENSITY))
    assert torch.equal(raw[0], ds[0][0][0]) and torch.equal(raw[1, :2], ds[1][0][0])
    assert view_present(raw.float()).tolist() == [[True] * 3, [True, True, False]]
    (raw, _), _ = collate_breasts([ds[1], ds[2]])
    assert raw.shape[:2] == (2, 2)
    # the width of the padding does not change a score: the padded slots are masked
    from rsna_utils.learn.data import DEFAULT_NORM, device_input
    m = create_breast_model("resnet18", 3, global_pool="gem").eval()

    def score(batch):
        (r, p), _ = batch
        x = device_input(r.flatten(0, 1), p.flatten(0, 1), DEFAULT_NORM, 3).unflatten(0, r.shape[:2])
        with torch.inference_mode():
            return m(x)[:, 0]
    wide, narrow = score(collate_breasts([ds[0], ds[1]])), score(collate_breasts([ds[1]]))
    assert torch.allclose(wide[1], narrow[0], atol=1e-5)
    with_aux = BreastDataset(table, (48, 48), aux=["age"])
    _, y = collate_breasts([with_aux[0], with_aux[1]])
    assert y.shape == (2, 2)


def test_resuming_a_run_trained_on_other_views_says_so(breast_run, tmp_path, capsys):
    """A breast-level run resumed with another breast_views (a run of two views, from before
    `all` became the default, continued with the default) is said, with the flag that keeps it."""
    import shutil
    root, _ = breast_run
    shutil.copytree(root / "breast", tmp_path / "breast")
    ran = torch.load(tmp_path / "breast" / "last.pt", weights_only=False)["config"]
    base = {**{k: v for k, v in ran.items() if k in TrainConfig.field_names()},
            "out": str(tmp_path / "breast"), "resume": True}
    train(TrainConfig(**{**base, "breast_views": "2"}))
    assert ("trained with breast_views all; the rest of the run reads 2 (a step's images, time "
            "and memory change with it); --breast-views all continues as it trained"
            ) in capsys.readouterr().err
    train(TrainConfig(**base))
    assert "trained with breast_views" not in capsys.readouterr().err


def test_train_level_breast_starts_from_an_image_run_and_scores_breasts(breast_run, synth_small):
    root, best = breast_run
    run = root / "breast"
    assert best["epoch"] == 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(metrics.breast_mean_auc).all()
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["level"] == "breast" and ck["aux"] == ["age"]
    val = pd.read_csv(run / "val_predictions.csv")
    # one score per breast: every view of a breast carries it
    assert (val.groupby("prediction_id").prediction.nunique() == 1).all()
    assert val.prediction.notna().all()
    assert json.loads((run / "config.json").read_text())["level"] == "breast"


def test_pretrained_report_names_the_image_run(tmp_path, png48b, synth_small, breast_run, capsys):
    root, _ = breast_run
    m = create_breast_model("resnet18", 3, root / "img" / "best.pt")
    assert "img/best.pt" in m.pretrained_report and "loaded" in m.pretrained_report
    img = torch.load(root / "img" / "best.pt", weights_only=True)["model"]
    assert torch.equal(m.backbone.conv1.weight.detach(), img["conv1.weight"])


def test_predict_pools_each_breast_and_writes_the_attention(tmp_path, breast_run, synth_small):
    root, _ = breast_run
    out = tmp_path / "submission.csv"
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "predict",
                        "--images", str(synth_small / "test_images"),
                        "--csv", str(synth_small / "test.csv"),
                        "--checkpoints", str(root / "breast" / "best.pt"), str(root / "img" / "best.pt"),
                        "--out", str(out), "--workers", "0", "--tta", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    imgs = pd.read_csv(tmp_path / "submission_images.csv")
    assert "attention" in imgs
    sums = imgs.groupby("prediction_id").attention.sum()
    assert np.allclose(sums, 1, atol=1e-4)
    sub = pd.read_csv(out)
    assert sub.cancer.between(0, 1).all() and len(sub) == imgs.prediction_id.nunique()
    # the ensemble's breast score: the image model's mean over views plus the breast model's
    from rsna_utils.infer.predict import load_models, predict
    alone = predict(synth_small / "test_images", synth_small / "test.csv",
                    [str(root / "breast" / "best.pt")], workers=0, tta=True, progress=False)
    pooled = alone.images.groupby("prediction_id").prediction
    assert (pooled.nunique() == 1).all()
    models, _ = load_models([str(root / "breast" / "best.pt")], "cpu")
    assert models[0].level == "breast"


def test_breast_with_no_readable_view_is_reported_not_scored(tmp_path, breast_run, synth_small):
    import shutil
    root, _ = breast_run
    test = pd.read_csv(synth_small / "test.csv")
    images = tmp_path / "images"
    shutil.copytree(synth_small / "test_images", images)
    gone = test.prediction_id.iloc[0]
    for r in test[test.prediction_id == gone].itertuples():
        (images / str(r.patient_id) / f"{r.image_id}.dcm").write_bytes(b"not a dicom")
    from rsna_utils.infer.predict import predict
    res = predict(images, synth_small / "test.csv", [str(root / "breast" / "best.pt")],
                  workers=0, progress=False, max_unreadable=0.9)
    rows = res.images[res.images.prediction_id == gone]
    assert rows.prediction.isna().all() and rows.problem.astype(bool).all()
    assert {w["prediction_id"] for w in res.warnings} >= {gone}
    # the breast gets the training prior, not the score of a blank image
    from rsna_utils.learn.checkpoint import read_checkpoint
    prior = read_checkpoint(root / "breast" / "best.pt")["prior"]
    assert res.submission.set_index("prediction_id").cancer[gone] == pytest.approx(prior)


def test_exam_report_shows_each_views_attention_and_the_pooled_score(tmp_path, breast_run,
                                                                     synth_small):
    from rsna_utils.infer.predict import predict
    from rsna_utils.reports.exam import write_exam_reports
    root, _ = breast_run
    ck = [str(root / "breast" / "best.pt")]
    res = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", ck,
                             tmp_path / "exams", limit=2, order="csv", device="cpu",
                             progress=False)
    views = pd.read_csv(res["heatmaps_csv"])
    assert views.attention.notna().all()
    assert np.allclose(views.groupby("prediction_id").attention.sum(), 1, atol=1e-4)
    # the breast score is the one `rsna predict` gives the breast
    pred = predict(synth_small / "test_images", synth_small / "test.csv", ck, workers=0,
                   progress=False).submission.set_index("prediction_id").cancer
    got = views.groupby("prediction_id").breast_score.first()
    assert np.allclose(got, pred.loc[got.index], atol=1e-4)
    assert all(Path(f).exists() for f in res["figures"])


def test_breast_stream_pools_each_breast_as_its_views_are_read_bit_for_bit(tiny_model):
    """Issue 41: `BreastStream` (each breast pooled once its rows are read, features dropped)
    gives exactly `breast_scores`' values (the same chunks), whatever the batches, with views
    of a breast apart in the table, unread rows, a breast with no view read, and the flip's
    features pooled apart; it holds a few breasts' features, not the table's."""
    from rsna_utils.learn.breast import BreastStream
    rng = np.random.default_rng(0)
    n, f = 41, tiny_model.num_features
    pid = np.array([f"b{i // 3}" for i in range(n)], object)    # 3 views a breast, in order
    pid[[5, 30]] = pid[[30, 5]]                                # two breasts' views far apart
    readable = rng.random(n) > 0.15
    readable[[9, 10, 11]] = False                              # b3: no view read
    feats = rng.normal(size=(n, 2, f)).astype(np.float16)      # (N, K=2 with the flip, F)
    full = feats.astype(np.float32)
    for chunk in (2, 3, 512):
        want = [breast_scores(tiny_model, full[:, k], readable, pid, "cpu", chunk=chunk)
                for k in range(2)]
        for batch in (1, 4, 7):
            s = BreastStream(tiny_model, pid, "cpu", chunk=chunk)
            for b in range(0, n, batch):
                s.add(list(range(b, min(n, b + batch))), feats[b:b + batch], readable[b:b + batch])
            prob, att = s.finish()
            for k in range(2):
                np.testing.assert_array_equal(prob[k], want[k][0])
                np.testing.assert_array_equal(att[k], want[k][1])
            assert not s.views and s.seen == 0
            if chunk == 2 and batch == 1:
                # held at most: the breasts spanning rows 5..30, not the 41 rows
                assert s.peak_held < readable.sum()
    assert np.isnan(prob[0, 9:12]).all() and np.isfinite(prob[0, readable]).all()
    # fed under the backbone's autocast (as predict feeds it), the attention still runs in
    # float32, as it did at the end of the run
    s = BreastStream(tiny_model, pid, "cpu", chunk=512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.add(list(range(n)), feats, readable)
        prob, att = s.finish()
    np.testing.assert_array_equal(prob[1], want[1][0])


def test_predict_with_a_breast_member_gives_the_same_scores_as_holding_every_view(
        tmp_path, breast_run, synth_small, monkeypatch):
    """Streaming the breast pooling inside predict changes no score: equal, bit for bit, to
    the same run holding every view's features until the end (the behaviour before)."""
    from rsna_utils.infer.predict import predict
    from rsna_utils.learn.breast import BreastStream
    root, _ = breast_run
    ck = [str(root / "breast" / "best.pt"), str(root / "img" / "best.pt")]
    args = (synth_small / "test_images", synth_small / "test.csv", ck)
    now = predict(*args, out=None, workers=0, tta=True, progress=False, batch_size=3)
    monkeypatch.setattr(BreastStream, "hold_all", True)
    before = predict(*args, out=None, workers=0, tta=True, progress=False, batch_size=3)
    np.testing.assert_array_equal(now.images.prediction, before.images.prediction)
    np.testing.assert_array_equal(now.images.attention, before.images.attention)
    pd.testing.assert_frame_equal(now.submission, before.submission)


def test_two_cpu_shards_with_a_breast_member_match_one_process_within_float_rounding(
        tmp_path, breast_run, synth_small):
    """`--shards 2` with a breast-level member: each shard pools its own breasts, in other
    calls than the one process's, so the scores agree within float32 rounding (stated as
    1e-5)."""
    from rsna_utils.infer.predict import predict
    root, _ = breast_run
    ck = [str(root / "breast" / "best.pt"), str(root / "img" / "best.pt")]
    args = (synth_small / "test_images", synth_small / "test.csv", ck)
    one = predict(*args, out=None, workers=0, tta=True, progress=False, device="cpu")
    two = predict(*args, out=None, workers=0, tta=True, progress=False, device="cpu", shards=2)
    assert list(two.submission.prediction_id) == list(one.submission.prediction_id)
    np.testing.assert_allclose(two.submission.cancer, one.submission.cancer, rtol=0, atol=1e-5)
    np.testing.assert_allclose(two.images.attention, one.images.attention, rtol=0, atol=1e-5)
    np.testing.assert_allclose(two.images.prediction, one.images.prediction, rtol=0, atol=1e-5)
