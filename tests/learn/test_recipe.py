"""The winner's recipe pieces (issue 37): the heavy augmentation level, label smoothing and head
dropout, each reachable from TrainConfig and each able to fail."""
import numpy as np
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.data import AUG_LEVELS, Augment
from rsna_utils.learn.models import WeightedBCE
from rsna_utils.learn.train_config import TrainConfig


def _breast(h=256, w=128, dtype=np.uint8):
    """A bright half-ellipse on the left edge with a brighter spot (a lesion) in it."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = ((((yy - h / 2) / (h * 0.45)) ** 2 + (xx / (w * 0.8)) ** 2) < 1) * 120
    img[h // 2 - 6:h // 2 + 6, w // 4:w // 4 + 12] = 250
    return img.astype(dtype)


def test_heavy_level_has_the_winners_transforms_and_changes_more_than_light():
    heavy = Augment.level("heavy")
    assert heavy.rotate == 30 and heavy.contrast == 0.4 and heavy.sized_crop == 0.4
    assert heavy.sized_crop_scale == (0.5, 1.0) and heavy.distort > 0 and heavy.downscale > 0
    img = _breast()
    rng = np.random.default_rng(0)
    changed = {}
    for name in AUG_LEVELS:
        a = Augment.level(name, hflip=0, vflip=0)            # geometry beyond the flips
        diffs = [np.abs(a(img, rng).astype(float) - img).mean() for _ in range(40)]
        changed[name] = float(np.mean(diffs))
    assert changed["heavy"] > 1.5 * changed["light"], changed


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_every_heavy_transform_keeps_shape_dtype_and_is_seeded(dtype):
    img = _breast(dtype=dtype)
    for part in (dict(sized_crop=1.0), dict(distort=1.0), dict(downscale=1.0)):
        a = Augment(hflip=0, vflip=0, rotate=0, scale=0, shift=0, dropout=0, **part)
        out = a(img, np.random.default_rng(3))
        assert out.shape == img.shape and out.dtype == img.dtype, part
        assert not np.array_equal(out, img), part                 # it did something
        assert np.array_equal(out, a(img, np.random.default_rng(3))), part   # same seed, same draw
        assert out.max() > 0


def test_grid_distortion_moves_the_lesion_but_keeps_it():
    img = _breast()
    a = Augment(hflip=0, vflip=0, rotate=0, scale=0, shift=0, dropout=0, distort=1.0)
    for seed in range(10):
        out = a(img, np.random.default_rng(seed))
        assert (out >= 200).sum() >= 0.5 * (img >= 200).sum(), seed     # the spot survives
        # the borders stay put: a smooth warp, not a shift of the whole image
        assert np.array_equal(out[0], img[0]) and np.array_equal(out[:, -1], img[:, -1])


def test_an_augmentation_level_that_does_not_exist_is_named():
    with pytest.raises(RsnaError, match="aug_level 'extreme'.*light, heavy"):
        Augment.level("extreme")
    with pytest.raises(RsnaError, match="aug_level"):
        TrainConfig(aug_level="extreme")
    assert TrainConfig(aug_level="heavy", augment=True).aug_level == "heavy"


def test_label_smoothing_moves_the_optimum_off_infinity():
    y = torch.tensor([1.0, 0.0])
    plain, smooth = WeightedBCE(), WeightedBCE(smoothing=0.1)
    big = torch.tensor([12.0, -12.0])
    best = torch.logit(torch.tensor([0.95, 0.05]))          # targets 0.95 / 0.05
    assert plain(big, y) < plain(best, y)                   # plain BCE: further is better
    assert smooth(best, y) < smooth(big, y)                 # smoothed: the optimum is finite
    # the gradient vanishes at the smoothed target
    x = best.clone().requires_grad_(True)
    smooth(x, y).backward()
    assert float(x.grad.abs().max()) < 1e-5
    # pos_weight still follows the true label
    w = WeightedBCE(w_pos=3.0, smoothing=0.1)
    assert float(w(best[:1], y[:1])) == pytest.approx(3 * float(smooth(best[:1], y[:1])), rel=1e-5)
    with pytest.raises(RsnaError, match="label_smoothing=1"):
        WeightedBCE(smoothing=1.0)


def test_train_config_reaches_the_model_and_the_loss():
    from rsna_utils.learn.train import create_optimisation, create_train_model
    cfg = TrainConfig(model="resnet18", size=64, head_dropout=0.5, label_smoothing=0.1,
                      global_pool="max", device="cpu", progress=False)
    model, _ = create_train_model(cfg, torch.device("cpu"), 0, 0, 1)
    assert model.drop_rate == 0.5 and model.global_pool.pool_type == "max"
    opt = create_optimisation(cfg, model, 10, torch.device("cpu"))
    assert opt.loss_fn.cancer_loss.smoothing == 0.1
    with pytest.raises(RsnaError, match="convnext_nano.*gem"):
        create_train_model(TrainConfig(model="convnext_nano", size=64, device="cpu"),
                           torch.device("cpu"), 0, 0, 1)
