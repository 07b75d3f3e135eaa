"""Mammogram augmentations: the geometric transforms the DataLoader workers apply to the
uint8/uint16 image, the intensity draw (gamma, contrast, brightness) applied where the image
becomes floats, and the named levels (`TrainConfig.aug_level`)."""
from __future__ import annotations

import cv2
import numpy as np

from rsna_utils.core.errors import RsnaError


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

# identity intensity parameters (gamma 1, contrast 1, brightness 0): no augmentation
NO_INTENSITY = np.array([1.0, 1.0, 0.0], np.float32)
