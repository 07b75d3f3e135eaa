"""Samplers that upsample positives (single process or DDP): the epoch's draw by source
weights (`weighted_draw`), the upsampled, shuffled epoch (`epoch_indices`), the layout with
positives in every batch (`batches_with_positives`), the sampler over them (`UpsampleSampler`)
and what it makes of the positives (`balance`, `check_ratio`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsna_utils.core.errors import RsnaError


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
