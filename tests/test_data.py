"""The training dataset's augmentation is alive: new draws every epoch and for every upsampled
copy of an image, also in persistent DataLoader workers."""
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from rsna_utils.data import Augment, PngDataset, worker_init


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
