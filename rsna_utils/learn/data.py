"""Datasets over the preprocessed PNGs, mammogram augmentations and samplers that upsample
positives (single process or DDP). The patient-grouped splits live with the RSNA table
(`core.table`) and are re-exported here."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import (  # noqa: F401 - the patient split's home is core.table
    check_split, holdout_split, patient_folds, png_path, with_prediction_id)

# ----------------------------------------------------------------------------------------
# Table of images
# ----------------------------------------------------------------------------------------

def load_table(csv: str | Path, png_dir: str | Path | None = None,
               require_png: bool = True) -> pd.DataFrame:
    """train.csv (or any CSV with patient_id, image_id, laterality, cancer) plus a `png` column.

    Images listed in the preprocessor's failures.csv are dropped (they have no PNG) and counted
    in `df.attrs["dropped"]`; any other missing PNG is an error naming it.
    """
    try:
        df = pd.read_csv(csv)
    except FileNotFoundError:
        raise RsnaError(f"{csv}: CSV not found; pass the train.csv path") from None
    need = {"patient_id", "image_id", "laterality"}
    if not need <= set(df.columns):
        raise RsnaError(f"{csv}: missing column(s) {sorted(need - set(df.columns))}")
    df = df.dropna(subset=["patient_id", "image_id"]).copy()
    df["patient_id"] = df["patient_id"].astype("int64")
    df["image_id"] = df["image_id"].astype("int64")
    df = with_prediction_id(df)
    if png_dir is None:
        return df
    png_dir = Path(png_dir)
    df["png"] = [str(png_path(png_dir, p, i)) for p, i in zip(df.patient_id, df.image_id)]
    failed: set[int] = set()
    for f in png_dir.glob("failures*.csv"):
        try:
            fd = pd.read_csv(f, dtype=str)
            failed |= {int(x) for x in fd["image_id"] if str(x).isdigit()}
        except (pd.errors.EmptyDataError, KeyError):
            pass
    dropped = df["image_id"].isin(failed)
    df = df[~dropped].reset_index(drop=True)
    df.attrs["dropped"] = int(dropped.sum())
    if require_png:
        exists = np.array([Path(p).exists() for p in df["png"]], dtype=bool)
        if not exists.all():
            missing = df.loc[~exists, "png"].tolist()
            raise RsnaError(f"{len(missing)} PNG(s) missing under {png_dir}, e.g. {missing[0]}; "
                            "run `rsna preprocess` on these images (or fix --data)")
    return df


# ----------------------------------------------------------------------------------------
# Augmentation and dataset
# ----------------------------------------------------------------------------------------

class Augment:
    """Mammogram-safe augmentation on uint8/uint16 arrays (numpy + OpenCV, fast on the CPU),
    the kinds the top RSNA teams used: horizontal/vertical flips, a small affine (rotation,
    scale, shift), coarse dropout (a few black boxes), gamma, brightness/contrast, optional
    random crop back to size."""

    def __init__(self, hflip: float = 0.5, vflip: float = 0.5, rotate: float = 10.0,
                 scale: float = 0.1, shift: float = 0.05, brightness: float = 0.1,
                 contrast: float = 0.15, random_crop: float = 0.0, gamma: float = 0.2,
                 dropout: float = 0.5, dropout_holes: int = 4, dropout_size: float = 0.1,
                 sized_crop: float = 0.0, sized_crop_scale: tuple = (0.5, 1.0),
                 distort: float = 0.0, distort_limit: float = 0.3, downscale: float = 0.0,
                 downscale_range: tuple = (0.5, 0.9)):
        self.hflip, self.vflip, self.rotate, self.scale, self.shift = hflip, vflip, rotate, scale, shift
        self.brightness, self.contrast, self.random_crop = brightness, contrast, random_crop
        self.gamma, self.dropout = gamma, dropout
        self.dropout_holes, self.dropout_size = dropout_holes, dropout_size
        self.sized_crop, self.sized_crop_scale = sized_crop, tuple(sized_crop_scale)
        self.distort, self.distort_limit = distort, distort_limit
        self.downscale, self.downscale_range = downscale, tuple(downscale_range)

    @classmethod
    def level(cls, name: str, **kw) -> "Augment":
        """The named level of `AUG_LEVELS` (light, heavy), with `kw` (None: the level's) on top. RsnaError naming the
        levels for any other name."""
        if name not in AUG_LEVELS:
            raise RsnaError(f"aug_level {name!r} does not exist; choose {', '.join(AUG_LEVELS)}")
        return cls(**{**AUG_LEVELS[name], **{k: v for k, v in kw.items() if v is not None}})

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        if rng.random() < self.hflip:
            img = img[:, ::-1]
        if rng.random() < self.vflip:
            img = img[::-1]
        if self.sized_crop and rng.random() < self.sized_crop:
            img = self._sized_crop(np.ascontiguousarray(img), rng)
        if self.distort and rng.random() < self.distort:
            img = self._grid_distort(np.ascontiguousarray(img), rng)
        if self.downscale and rng.random() < self.downscale:
            f = rng.uniform(*self.downscale_range)
            small = cv2.resize(np.ascontiguousarray(img), (max(1, int(w * f)), max(1, int(h * f))),
                               interpolation=cv2.INTER_AREA)
            img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.rotate or self.scale or self.shift:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-self.rotate, self.rotate),
                                        1 + rng.uniform(-self.scale, self.scale))
            m[:, 2] += (rng.uniform(-self.shift, self.shift) * w, rng.uniform(-self.shift, self.shift) * h)
            img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if self.random_crop > 0:
            f = 1 - rng.uniform(0, self.random_crop)
            ch, cw = int(h * f), int(w * f)
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = cv2.resize(np.ascontiguousarray(img[y:y + ch, x:x + cw]), (w, h),
                             interpolation=cv2.INTER_LINEAR)
        img = np.ascontiguousarray(img)
        if self.dropout and rng.random() < self.dropout:
            img = img.copy()     # never write into a cached array
            for _ in range(int(rng.integers(1, self.dropout_holes + 1))):
                bh = max(1, int(h * rng.uniform(0.3, 1.0) * self.dropout_size))
                bw = max(1, int(w * rng.uniform(0.3, 1.0) * self.dropout_size))
                y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                img[y:y + bh, x:x + bw] = 0
        return img

    def _sized_crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A box of a random share of the area (sized_crop_scale) with the image's aspect
        within +-20%, resized back to the image's size (albumentations' RandomSizedCrop)."""
        h, w = img.shape[:2]
        area = rng.uniform(*self.sized_crop_scale) * h * w
        aspect = (w / h) * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
        ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return cv2.resize(np.ascontiguousarray(img[y:y + ch, x:x + cw]), (w, h),
                          interpolation=cv2.INTER_LINEAR)

    def _grid_distort(self, img: np.ndarray, rng: np.random.Generator, cells: int = 5) -> np.ndarray:
        """A smooth elastic warp: each node of a (cells+1)^2 grid moves by up to distort_limit of
        a cell, the displacement interpolated (cubic) to every pixel; the borders stay fixed."""
        h, w = img.shape[:2]
        d = rng.uniform(-self.distort_limit, self.distort_limit, (2, cells + 1, cells + 1))
        d[:, [0, -1], :] = 0
        d[:, :, [0, -1]] = 0
        dx = cv2.resize((d[0] * w / cells).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        dy = cv2.resize((d[1] * h / cells).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return cv2.remap(img, gx + dx, gy + dy, interpolation=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def intensity_params(self, rng: np.random.Generator) -> np.ndarray:
        """(gamma exponent, contrast, brightness) of one draw: what `intensity` applies, drawn
        in the worker and applied where the image becomes floats (the device, `device_input`)."""
        g = float(np.exp(rng.uniform(-self.gamma, self.gamma))) if self.gamma else 1.0
        c = 1 + rng.uniform(-self.contrast, self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        return np.array([g, c, b], np.float32)

    def intensity(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gamma, then contrast and brightness, on a [0, 1] image."""
        g, c, b = self.intensity_params(rng)
        if g != 1.0:
            x = np.power(np.clip(x, 0, 1), g)
        return (x - 0.5) * c + 0.5 + b


# The named levels (TrainConfig.aug_level). heavy: the 1st place's set, read from its code
# (RSNA_DATA.md): a random-sized crop (p 0.4, scale 0.5-1), rotation up to 30 degrees, an
# elastic grid distortion, a downscale, contrast up to 0.4 and coarse dropout; its tone curve is
# the gamma draw here (a monotone curve of the intensities).
AUG_LEVELS = {
    "light": {},
    "heavy": dict(rotate=30.0, scale=0.15, shift=0.1, contrast=0.4, brightness=0.15, gamma=0.3,
                  sized_crop=0.4, sized_crop_scale=(0.5, 1.0), distort=0.3, distort_limit=0.3,
                  downscale=0.2, downscale_range=(0.5, 0.9), dropout=0.5, dropout_holes=8,
                  dropout_size=0.15),
}


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


# identity intensity parameters (gamma 1, contrast 1, brightness 0): no augmentation
NO_INTENSITY = np.array([1.0, 1.0, 0.0], np.float32)


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
    kept, black padding) and `to_input`. The package's own paths batch it (`predict.raw_batch`
    + `device_input`); tests and benchmarks use this as the reference they must equal."""
    from rsna_utils.image import roi
    size = (size, size) if isinstance(size, int) else tuple(size)
    img = roi.resize(img, size, "pad")
    return to_input(img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0), norm, channels)


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


# ----------------------------------------------------------------------------------------
# Upsampling positives
# ----------------------------------------------------------------------------------------

def weighted_draw(weights: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The items one epoch draws by their sampling weights (a source's, `learn.mix`): item i
    floor(w_i) times, and once more with probability w_i - floor(w_i). The fractional draws
    are one systematic sample over the items ordered by label, then weight (a source), shuffled
    within: each such group gets its share to within one item (0.5: half of a source's
    negatives and half of its positives, a fresh half each epoch), the epoch's length varies by
    at most one, and a group whose weights add up to 1 or more is never left out."""
    w = np.asarray(weights, np.float64)
    if w.shape != (len(labels),) or not np.isfinite(w).all() or (w < 0).any():
        raise RsnaError(f"sampling weights: need one finite weight >= 0 per training item "
                        f"({len(labels)}), got shape {w.shape}; check source_weights")
    whole = np.floor(w).astype(np.int64)
    frac = w - whole
    base = np.repeat(np.arange(len(w)), whole)
    cand = np.flatnonzero(frac > 1e-12)
    if not len(cand):
        return base
    cand = cand[rng.permutation(len(cand))]
    cand = cand[np.lexsort((frac[cand], labels[cand] > 0.5))]    # stable: shuffled within
    edges = np.floor(np.concatenate([[0.0], np.cumsum(frac[cand])]) + rng.random())
    return np.concatenate([base, cand[np.diff(edges) > 0]])


def epoch_indices(labels: np.ndarray, epoch: int, seed: int, upsample: float = 1.0,
                  target_ratio: float | None = None,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Shuffled indices of one epoch with positives repeated.

    upsample: each positive appears this many times (the original project used 5).
    target_ratio: alternatively, repeat positives until they make up this share of the epoch.
    weights: per item, how many times it is drawn an epoch on average before the positives are
    repeated (`weighted_draw`; a source's weight, `TrainConfig.source_weights`); None: once each.
    Upsampling and target_ratio then apply to the drawn items, so a positive of weight w is seen
    w x upsample times on average and target_ratio holds in the weighted epoch.
    """
    labels = np.asarray(labels)
    if weights is None:
        drawn = np.arange(len(labels))
    else:
        drawn = weighted_draw(weights, labels, np.random.default_rng([seed, epoch, 2]))
    is_pos = labels[drawn] > 0.5
    pos, neg = drawn[is_pos], drawn[~is_pos]
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise RsnaError(f"target_ratio={target_ratio}: give a share in (0, 1)")
        if len(pos):
            upsample = max(1.0, target_ratio * len(neg) / ((1 - target_ratio) * len(pos)))
    if upsample < 1:
        raise RsnaError(f"upsample={upsample}: give a factor >= 1")
    whole, frac = int(upsample), upsample - int(upsample)
    rng = np.random.default_rng([seed, epoch])
    extra = rng.choice(pos, size=int(round(frac * len(pos))), replace=False) if len(pos) else pos
    idx = np.concatenate([neg] + [pos] * whole + [extra])
    rng.shuffle(idx)
    return idx


def batches_with_positives(idx: np.ndarray, labels: np.ndarray, batch_size: int,
                           min_positives: int, seed: int, epoch: int,
                           world_size: int = 1) -> np.ndarray:
    """The epoch `idx` laid out so that every batch of `batch_size` holds at least
    `min_positives` positive images (the 1st place solution kept one per batch).

    The positives of `idx` are spread over the batches first; where there are too few, more
    copies of randomly drawn positives are added. The epoch is filled up to whole batches (a
    multiple of world_size of them) with random entries of `idx`, so its length depends only on
    the counts, not on the draw. For DDP the batches are interleaved so that rank r, taking every
    world_size-th entry from r on, reads whole batches in order."""
    labels = np.asarray(labels)
    if min_positives <= 0:
        return idx
    if min_positives >= batch_size:
        raise RsnaError(f"min_positives={min_positives}: must be below batch_size={batch_size}, "
                        f"or no negative fits in a batch; lower it (1 is usual)")
    is_pos = labels[idx] > 0.5
    pos, rest = idx[is_pos], idx[~is_pos]
    if not len(pos):
        raise RsnaError(f"min_positives={min_positives}: the training set has no positive "
                        f"image to put in a batch; set it to 0 or check the labels")
    rng = np.random.default_rng([seed, epoch, 1])
    unique_pos = np.unique(pos)
    while True:
        n_batches = -(-(len(pos) + len(rest)) // batch_size)
        n_batches = -(-n_batches // world_size) * world_size
        short = n_batches * min_positives - len(pos)
        if short <= 0:
            break
        pos = np.concatenate([pos, rng.choice(unique_pos, size=short)])
    rng.shuffle(pos)
    pool = np.concatenate([pos[n_batches * min_positives:], rest])
    fill = n_batches * batch_size - len(pos) - len(rest)
    pool = np.concatenate([pool, rng.choice(idx, size=fill)])
    rng.shuffle(pool)
    out = np.concatenate([pos[:n_batches * min_positives].reshape(n_batches, min_positives),
                          pool.reshape(n_batches, batch_size - min_positives)], axis=1)
    out = rng.permuted(out, axis=1)                      # the positives anywhere in their batch
    # chunk of world_size batches -> position i * world_size + r holds batch r's i-th image
    out = out.reshape(-1, world_size, batch_size).transpose(0, 2, 1)
    return out.reshape(-1)


@dataclass
class Balance:
    """What the sampler and the loss weight make of the positives in one epoch."""
    images: int                # training images
    positives: int             # of them positive
    epoch_images: int          # images drawn in one epoch
    exposures: float           # times each positive is seen per epoch (1: once)
    epoch_share: float         # positives' share of the epoch's images
    loss_share: float          # positives' share of the loss at the start (logits near 0)
    natural_share: float       # their share with no sampler and no weight (the data's rate)
    unit: str = "images"       # what an item is: images, or breasts (level breast)

    def line(self) -> str:
        times = self.loss_share / self.natural_share if self.natural_share else float("nan")
        return (f"balance: {self.positives} of {self.images} training {self.unit} positive "
                f"({self.natural_share:.1%}); each positive is seen {self.exposures:.1f} times an "
                f"epoch ({self.epoch_share:.1%} of its {self.epoch_images} {self.unit}) and positives "
                f"carry {self.loss_share:.0%} of the loss at the start, {times:.1f} times their "
                "natural weight")


def check_ratio(labels, target_ratio: float | None, min_positives: int, batch_size: int,
                upsample: float = 1.0) -> None:
    """A sampler ratio the per-batch rule cannot keep is an error naming both and the fix: on data
    rarer than the ratio, at least `min_positives` of every `batch_size` images make positives
    min_positives / batch_size of the epoch; above the target that is not the ratio asked for.
    (On data as rich as the ratio there is nothing to meet.)"""
    labels = np.asarray(labels)
    if upsample != 1.0 or target_ratio is None or not min_positives or not len(labels):
        return
    natural, floor = float((labels > 0.5).mean()), min_positives / batch_size
    if natural < target_ratio and floor > target_ratio + 1e-9:
        raise RsnaError(f"target_ratio={target_ratio:g} cannot be met with min_positives="
                        f"{min_positives} in a batch of {batch_size}: at least {floor:.0%} of every "
                        f"batch is positive (the data has {natural:.1%}); raise batch_size to "
                        f"{math.ceil(min_positives / target_ratio)} or more, or set min_positives 0")


def balance(labels, upsample: float = 1.0, target_ratio: float | None = None,
            batch_size: int = 16, min_positives: int = 0, pos_weight: float = 1.0,
            neg_weight: float = 1.0, seed: int = 0, weights: np.ndarray | None = None) -> Balance:
    """The balance of one epoch as `UpsampleSampler` draws it (the items by their source
    `weights`, upsample or target_ratio when upsample is 1, then at least `min_positives` per
    batch) and the weighted BCE weighs it: at the start every logit is near 0, so every image's
    loss is about log 2 and the positives' share of the loss is w_pos * drawn positives /
    (w_pos * P + w_neg * N)."""
    labels = np.asarray(labels)
    idx = UpsampleSampler(labels, seed, upsample, target_ratio if upsample == 1.0 else None,
                          batch_size=batch_size, min_positives=min_positives,
                          weights=weights)._indices()
    pos = int((labels[idx] > 0.5).sum())
    neg = len(idx) - pos
    n_pos = int((labels > 0.5).sum())
    return Balance(images=len(labels), positives=n_pos, epoch_images=len(idx),
                   exposures=pos / n_pos if n_pos else float("nan"),
                   epoch_share=pos / len(idx) if len(idx) else float("nan"),
                   loss_share=pos_weight * pos / (pos_weight * pos + neg_weight * neg)
                   if len(idx) else float("nan"),
                   natural_share=n_pos / len(labels) if len(labels) else float("nan"))


class UpsampleSampler:
    """Sampler over `epoch_indices`, sharded for DDP: every rank sees the same shuffled,
    upsampled list, takes every world_size-th entry, padded to equal length (so the ranks
    run the same number of steps). min_positives > 0: laid out by `batches_with_positives`
    for loaders of `batch_size`. weights: per item, its source's sampling weight
    (`epoch_indices`); the epoch's length is fixed by epoch 0's, a later epoch whose weighted
    draw came out an item longer or shorter is cut or padded to it (whole batches with
    min_positives)."""

    def __init__(self, labels: np.ndarray, seed: int = 0, upsample: float = 1.0,
                 target_ratio: float | None = None, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, min_positives: int = 0, weights: np.ndarray | None = None):
        self.labels, self.seed, self.upsample, self.target_ratio = labels, seed, upsample, target_ratio
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.min_positives = batch_size, min_positives
        self.weights = None if weights is None else np.asarray(weights, np.float64)
        self.epoch = 0
        self._len = math.ceil(len(self._indices()) / world_size)

    @staticmethod
    def item_weights(dataset, row_weights) -> np.ndarray | None:
        """The `weights` of a sampler over `dataset` from one weight per row of the table it
        reads (the `source_weight` column `train.make_split` adds with source_weights): per
        item, its row's; an item of several rows (a breast's views, `dataset.rows`) takes
        theirs. None stays None (no weights)."""
        if row_weights is None:
            return None
        w = np.asarray(row_weights, np.float64)
        rows = getattr(dataset, "rows", None)
        if rows is None:
            return w
        return np.array([w[np.asarray(r)].max() if len(r) else 1.0 for r in rows])

    def _indices(self) -> np.ndarray:
        idx = epoch_indices(self.labels, self.epoch, self.seed, self.upsample, self.target_ratio,
                            self.weights)
        return batches_with_positives(idx, self.labels, self.batch_size, self.min_positives,
                                      self.seed, self.epoch, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        idx = self._indices()
        total = self._len * self.world_size
        if len(idx) < total:
            idx = np.concatenate([idx, idx[: total - len(idx)]])
        return iter(idx[self.rank:total:self.world_size].tolist())

    def __len__(self) -> int:
        return self._len
