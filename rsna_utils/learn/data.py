"""The dataset over the preprocessed PNGs and the model's input tensors (the CPU path,
`to_input` / `model_input`, and the batch path on the device, `device_input`), with the
auxiliary targets and the DataLoader workers' setup.

The other jobs live in their own modules and are re-exported here, so `rsna_utils.learn.data`
keeps every name it had: the table of images (`learn.png_table`), the augmentations
(`learn.augment`), the samplers (`learn.samplers`) and the patient-grouped splits (`core.table`)."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import (  # noqa: F401 - the patient split's home is core.table
    check_split, holdout_split, patient_folds, png_path, with_prediction_id)
from rsna_utils.learn.augment import AUG_LEVELS, NO_INTENSITY, Augment  # noqa: F401
from rsna_utils.learn.png_table import load_table  # noqa: F401
from rsna_utils.learn.samplers import (  # noqa: F401
    Balance, UpsampleSampler, balance, batches_with_positives, check_ratio, epoch_indices,
    weighted_draw)

# ----------------------------------------------------------------------------------------
# Input tensors and dataset
# ----------------------------------------------------------------------------------------

DEFAULT_NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))   # checkpoints written before the norm was stored


def to_input(x: np.ndarray, norm=DEFAULT_NORM, channels: int = 3):
    """A [0, 1] float image (H, W) -> the model's input tensor (C, H, W): repeated to
    `channels` and normalised per channel with the backbone's pretrained mean / std (stored in
    the checkpoint). The dataset's finished tensors (`raw=False`) and `model_input` end here;
    the batch path (`device_input`: training on the device and inference) does the same
    arithmetic in the same order."""
    import torch
    mean, std = (np.asarray(v, np.float32)[:channels] for v in norm)
    x = np.ascontiguousarray(x, dtype=np.float32)
    t = torch.from_numpy(x)[None].expand(channels, -1, -1)
    return (t - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]


def device_input(raw, intensity=None, norm=DEFAULT_NORM, channels: int = 3,
                 channels_last: bool = False):
    """The model's input batch made where the batch already is (the GPU in training): workers
    hand over the image as read and geometrically augmented, uint8 or uint16 (B, 1, H, W), a
    twelfth (a sixth) of float32 x 3 channels; here it becomes [0, 1] floats, gets its
    intensity augmentation (`intensity`: (B, 3) gamma exponent, contrast, brightness, from
    `Augment.intensity_params`; None: none), then the channels and the backbone's mean / std
    (`to_input`'s arithmetic, in the same order, so the pixels equal the CPU path's). A float
    batch (the CPU path) passes through."""
    import torch
    if raw.is_floating_point():
        x = raw
    else:
        scale = 65535.0 if raw.dtype == torch.uint16 else 255.0
        x = raw.to(torch.float32) / scale
        if intensity is not None:
            g, c, b = (intensity[:, k].to(x.device, torch.float32).view(-1, 1, 1, 1) for k in range(3))
            if bool((g != 1).any()):
                x = torch.where(g != 1, x.clamp(0, 1).pow(g), x)
            x = (x - 0.5) * c + 0.5 + b
        mean, std = (torch.tensor(np.asarray(v, np.float32)[:channels], device=x.device)
                     .view(1, channels, 1, 1) for v in norm)
        x = (x.expand(-1, channels, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_bytes(batch) -> int:
    """Bytes of the tensors of one collated batch (what workers put in shared memory)."""
    import torch
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, (list, tuple)):
        return sum(batch_bytes(b) for b in batch)
    return 0


def model_input(img: np.ndarray, size, norm=DEFAULT_NORM, channels: int = 3):
    """An output image (uint8 / uint16, 0 = background) -> model input of `size` (height,
    width), one image on the CPU: the resize of training and inference (`roi.resize`, aspect
    kept, black padding) and `to_input`. The package's own paths batch it (`raw_batch`
    + `device_input`); tests and benchmarks use this as the reference they must equal."""
    from rsna_utils.image import roi
    size = (size, size) if isinstance(size, int) else tuple(size)
    img = roi.resize(img, size, "pad")
    return to_input(img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0), norm, channels)


def raw_batch(imgs: list, size):
    """The output images resized to `size` (`roi.resize`, aspect kept, black padding: training's
    resize) as one (N, 1, H, W) uint8 / uint16 tensor: what goes to the device, once per size
    (inference's batches and the exported engine's probe, then `device_input`)."""
    import torch

    from rsna_utils.image import roi
    arrays = [roi.resize(im, size, "pad") for im in imgs]
    if len({a.dtype for a in arrays}) > 1:                    # 8- and 16-bit PNGs mixed
        arrays = [a.astype(np.uint16) * (257 if a.dtype == np.uint8 else 1) for a in arrays]
    return torch.from_numpy(np.stack(arrays))[:, None]


# Auxiliary targets from train.csv's metadata (2nd and 4th place used them): each becomes a
# target in [0, 1] for a BCE-with-logits head, NaN (masked) where missing.
AUX_TARGETS = {
    "biopsy": "binary", "invasive": "binary", "difficult_negative_case": "binary",
    "view": "MLO vs CC", "BIRADS": "0-2 scaled to 0-1 (other values, e.g. another source's "
    "BI-RADS 3-5, masked)", "density": "A-D scaled to 0-1",
    "age": "(age - 40) / 50, clipped to 0-1",
}


def aux_targets(df: pd.DataFrame, names: list[str], where: str = "the CSV") -> np.ndarray:
    """(N, len(names)) float32 targets in [0, 1], NaN where the value is missing or unknown."""
    out = np.full((len(df), len(names)), np.nan, np.float32)
    for j, name in enumerate(names):
        if name not in AUX_TARGETS:
            raise RsnaError(f"auxiliary target {name!r}: choose from {', '.join(AUX_TARGETS)}")
        if name not in df:
            raise RsnaError(f"{where}: no {name!r} column for the auxiliary target; remove it from "
                            "aux or use a CSV that has it (RSNA train.csv does)")
        v = df[name]
        if name in ("biopsy", "invasive", "difficult_negative_case"):
            t = v.map(lambda x: {True: 1.0, False: 0.0, "True": 1.0, "False": 0.0, 1: 1.0, 0: 0.0,
                                 1.0: 1.0, 0.0: 0.0}.get(x, np.nan))
        elif name == "view":
            t = v.astype(str).str.upper().map({"MLO": 1.0, "CC": 0.0})
        elif name == "BIRADS":      # RSNA's 0-2 scale; other sources' BI-RADS 3-5: masked
            b = pd.to_numeric(v, errors="coerce")
            t = (b / 2.0).where(b.between(0, 2))
        elif name == "density":
            t = v.astype(str).str.upper().map({"A": 0.0, "B": 1 / 3, "C": 2 / 3, "D": 1.0})
        else:
            t = ((pd.to_numeric(v, errors="coerce") - 40.0) / 50.0).clip(0, 1)
        out[:, j] = t.to_numpy(np.float32)
    return out


def worker_init(worker_id: int) -> None:
    """One OpenCV and one torch thread per DataLoader worker: on the 16-core H200 machine, 14
    workers each starting 16 threads fed resnext50 at 0.37x its random-input speed."""
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class PngDataset:
    """(input, label float32) per row of the table.

    Images are read with OpenCV (8 or 16-bit PNG), resized if they differ from `size` and
    geometrically augmented. `raw=True` (training): the input is ((1, H, W) uint8/uint16 tensor,
    its intensity parameters (3,) float32), made into the model input on the device by
    `device_input`. `raw=False`: the finished (C, H, W) float32 tensor, scaled to [0, 1],
    intensity-augmented, repeated to `channels` and normalised here (`to_input`); both give the
    same pixels. `cache=True` keeps the decoded uint8/uint16 arrays in memory after the first
    epoch (no PNG decoding afterwards).
    """

    def __init__(self, df: pd.DataFrame, size: tuple[int, int] | int, channels: int = 3,
                 augment: Augment | None = None, seed: int = 0, cache: bool = False,
                 label: str = "cancer", norm=DEFAULT_NORM, aux: list[str] | None = None,
                 raw: bool = False):
        self.paths = df["png"].tolist()
        self.labels = (df[label].to_numpy(np.float32) if label in df
                       else np.zeros(len(df), np.float32))
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if channels not in (1, 3):
            raise RsnaError(f"channels={channels}: choose 1 or 3")
        self.channels, self.augment, self.seed, self.norm = channels, augment, seed, norm
        self.raw = raw
        # with auxiliary targets the label is a vector: [cancer, aux...]
        self.aux = aux_targets(df, list(aux)) if aux else None
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        """A random stream per process that goes on across epochs: every draw of an image,
        upsampled copies too, gets its own augmentation (a seed per (epoch, index) froze them:
        persistent workers never saw the epoch, and copies shared the index). Reproducible:
        seeded by the dataset seed, the DataLoader worker's seed and the epoch the stream
        starts in (workers start in the first epoch of the process: a resumed run continues
        with new draws instead of replaying epoch 0's)."""
        import torch
        info = torch.utils.data.get_worker_info()
        rank = int(os.environ.get("RANK", 0))       # DDP ranks share torch seeds: keep them apart
        key = (info.id, info.seed % 2**32, rank) if info is not None else (-1, 0, rank)
        if getattr(self, "_rng_key", None) != key:
            self._rng_key = key
            self._rng_state = np.random.default_rng([self.seed, key[0] + 1, key[1], key[2],
                                                     self.epoch])
        return self._rng_state

    def read(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = cv2.imread(self.paths[i], cv2.IMREAD_UNCHANGED)
        if img is None:
            raise RsnaError(f"{self.paths[i]}: cannot read the PNG (missing or corrupt); "
                            "rerun `rsna preprocess`")
        if img.ndim == 3:
            img = img[..., 0]
        if img.shape != self.size:   # the same resize as inference (aspect kept, black pad)
            from rsna_utils.image import roi
            img = roi.resize(img, self.size, "pad")
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        import torch
        img = self.read(i)
        scale = 65535.0 if img.dtype == np.uint16 else 255.0
        if self.raw:
            params = NO_INTENSITY
            if self.augment is not None:
                rng = self._rng()
                img = self.augment(img, rng)
                params = self.augment.intensity_params(rng)
            t = (torch.from_numpy(np.ascontiguousarray(img))[None], torch.from_numpy(params))
        elif self.augment is not None:
            rng = self._rng()
            img = self.augment(img, rng)
            t = to_input(self.augment.intensity(img.astype(np.float32) / scale, rng), self.norm,
                         self.channels)
        else:
            t = to_input(img.astype(np.float32) / scale, self.norm, self.channels)
        if self.aux is not None:
            return t, torch.from_numpy(np.concatenate([[self.labels[i]], self.aux[i]]).astype(np.float32))
        return t, torch.tensor(self.labels[i])
