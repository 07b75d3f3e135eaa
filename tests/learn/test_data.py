"""The training dataset's augmentation is alive: new draws every epoch and for every upsampled
copy of an image, also in persistent DataLoader workers."""
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from rsna_utils.learn.data import Augment, PngDataset, worker_init


def _pngs(tmp_path, n=3):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (64, 32), dtype=np.uint8))
        rows.append(dict(png=str(p), cancer=i % 2))
    return pd.DataFrame(rows)


def test_every_draw_of_an_image_is_augmented_anew(tmp_path):
    ds = PngDataset(_pngs(tmp_path), (64, 32), 1, Augment(), seed=1)
    a, b = ds[0][0], ds[0][0]
    assert not torch.equal(a, b)                    # the same index twice: two augmentations
    plain = PngDataset(_pngs(tmp_path), (64, 32), 1, None)
    assert torch.equal(plain[0][0], plain[0][0])     # no augmentation: identical


@pytest.mark.heavy
def test_persistent_workers_augment_differently_each_epoch(tmp_path):
    ds = PngDataset(_pngs(tmp_path), (64, 32), 1, Augment(), seed=1)
    dl = DataLoader(ds, batch_size=2, sampler=[0, 0], num_workers=1, persistent_workers=True,
                    multiprocessing_context="forkserver", worker_init_fn=worker_init)
    seen = [x[k] for _ in range(2) for x, _ in dl for k in range(2)]
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.equal(seen[i], seen[j]), (i, j)   # upsampled copies and epochs differ


def test_augmentation_is_reproducible_from_the_seed(tmp_path):
    df = _pngs(tmp_path)
    a = PngDataset(df, (64, 32), 1, Augment(), seed=5)
    b = PngDataset(df, (64, 32), 1, Augment(), seed=5)
    assert all(torch.equal(a[i][0], b[i][0]) for i in (0, 1, 2, 0))


def test_a_resumed_run_does_not_replay_the_first_epochs_draws(tmp_path):
    """A run resumed at epoch 3 starts its random stream there (workers are created in the
    first epoch of the process): not epoch 0's augmentations again, and reproducible."""
    df = _pngs(tmp_path)

    def first_draws(start):
        ds = PngDataset(df, (64, 32), 1, Augment(), seed=5)
        ds.set_epoch(start)
        return [ds[i][0] for i in (0, 1, 2)]
    fresh, resumed, again = first_draws(0), first_draws(3), first_draws(3)
    assert not any(torch.equal(a, b) for a, b in zip(fresh, resumed))
    assert all(torch.equal(a, b) for a, b in zip(resumed, again))


def test_training_and_cpu_inference_feed_the_model_the_same_pixels(tmp_path, synth_small):
    """One DICOM, two roads at a 2:1 input: PNG -> PngDataset (training) and DICOM in memory ->
    scoring.batch_input (inference). Both go through roi.resize once, so the tensors are equal."""
    import json

    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.infer.predict import DicomStream, LoadedModel, batch_input
    from rsna_utils.learn.data import load_table
    Preprocessor(PreprocessConfig(size=(96, 64)), workers=0, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", tmp_path / "png")
    df = load_table(synth_small / "train.csv", tmp_path / "png").head(6).reset_index(drop=True)
    size, norm = (80, 40), ((0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    train_ds = PngDataset(df, size, 3, None, 0, False, norm=norm)
    pre = json.loads((tmp_path / "png" / "preprocess.json").read_text())
    pre = {k: v for k, v in pre.items() if k in PreprocessConfig.__dataclass_fields__}
    stream = DicomStream(df, synth_small / "train_images", pre)
    m = LoadedModel(None, "resnet18", "-", 0.5, 0.0, size, norm, 3)
    for i in range(len(df)):
        img, _, why, _ = stream[i]
        assert not why, why
        x_infer = batch_input([img], m, 3, size)[0]
        x_train = train_ds[i][0]
        assert x_train.shape == x_infer.shape == (3, 80, 40)
        assert torch.equal(x_train, x_infer), (i, float((x_train - x_infer).abs().max()))
    assert float(x_train.std()) > 0.1                   # a breast, not an empty canvas


def test_balance_counts_what_the_sampler_and_the_loss_weight_do():
    """Issue 30's arithmetic: how often a positive is seen and its share of the loss."""
    from rsna_utils.learn.data import balance
    labels = np.array([1] * 20 + [0] * 980)
    b = balance(labels, upsample=5.0, pos_weight=5.0)
    assert (b.images, b.positives, b.epoch_images) == (1000, 20, 1080)
    assert b.exposures == 5.0 and b.epoch_share == pytest.approx(100 / 1080)
    assert b.loss_share == pytest.approx(500 / (500 + 980)) and b.natural_share == 0.02
    plain = balance(labels)
    assert plain.exposures == 1.0 and plain.loss_share == pytest.approx(0.02)
    ratio = balance(labels, target_ratio=0.125, min_positives=1, batch_size=16)
    assert ratio.epoch_share >= 0.125 and ratio.loss_share == pytest.approx(ratio.epoch_share)
    assert "each positive is seen 5.0 times an epoch" in b.line()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_raw_input_made_on_the_device_equals_the_cpu_input(tmp_path, dtype, channels):
    """Workers hand over the image as read (uint8 / uint16, one channel) with its intensity
    parameters; `device_input` makes the model input where the batch is (here the CPU device):
    the same pixels as the finished float input of the CPU path, for the same random draws,
    augmented or not, through a DataLoader's collate too."""
    from torch.utils.data.dataloader import default_collate

    from rsna_utils.learn.data import batch_bytes, device_input
    rng = np.random.default_rng(3)
    top = 65535 if dtype == np.uint16 else 255
    rows = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, top, (64, 32)).astype(dtype))
        rows.append(dict(png=str(p), cancer=i % 2))
    df = pd.DataFrame(rows)
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for aug in (Augment(random_crop=0.1), None):
        cpu = PngDataset(df, (64, 32), channels, aug, seed=7, norm=norm)
        raw = PngDataset(df, (64, 32), channels, aug, seed=7, norm=norm, raw=True)
        want = default_collate([cpu[i] for i in range(4)])
        got = default_collate([raw[i] for i in range(4)])
        (img, params), y = got
        assert img.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype and img.shape == (4, 1, 64, 32)
        assert torch.equal(y, want[1])
        x = device_input(img, params, norm, channels)
        assert x.shape == want[0].shape == (4, channels, 64, 32)
        assert torch.allclose(x, want[0], atol=1e-5), float((x - want[0]).abs().max())
        # a twelfth (uint8) or a sixth (uint16) of the float batch's bytes, plus 12 per image
        assert batch_bytes(got[0]) == img.nelement() * img.element_size() + 4 * 3 * 4
        assert batch_bytes(want[0]) == 4 * channels * 64 * 32 * 4
    assert torch.equal(device_input(want[0], None, norm, channels), want[0])   # floats pass


def test_training_from_raw_batches_matches_the_float_path_step_for_step(tmp_path):
    """One optimiser step of the same model on the same draws: from the raw batch (cast and
    normalised in the step) and from the finished float batch, the same loss and weights."""
    import copy

    from torch.utils.data.dataloader import default_collate

    from rsna_utils.learn.data import device_input
    from rsna_utils.learn.models import create_model
    df = _pngs(tmp_path, 4)
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    cpu = PngDataset(df, (64, 32), 3, Augment(), seed=2, norm=norm)
    raw = PngDataset(df, (64, 32), 3, Augment(), seed=2, norm=norm, raw=True)
    (xf, y), ((img, params), _) = (default_collate([d[i] for i in range(4)]) for d in (cpu, raw))
    torch.manual_seed(0)
    a = create_model("resnet18", 3, None).train()
    b = copy.deepcopy(a)
    losses = []
    for net, x in ((a, xf), (b, device_input(img, params, norm, 3))):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_birads_aux_target_reads_rsnas_scale_and_masks_other_sources_values():
    from rsna_utils.learn.data import aux_targets
    df = pd.DataFrame({"BIRADS": [0, 1, 2, 4, 5, None]})
    t = aux_targets(df, ["BIRADS"])[:, 0]
    np.testing.assert_allclose(t[:3], [0.0, 0.5, 1.0])
    assert np.isnan(t[3:]).all()          # VinDr / CBIS-DDSM BI-RADS 4-5, a missing value
