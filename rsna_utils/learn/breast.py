"""The breast-level model (`rsna train --level breast`): the views of one breast (a CC, an MLO
and any other) through one backbone, their features pooled with learned, gated attention (Ilse et al.,
2018), one logit per breast. Several top RSNA teams read the two views together; a view that
is missing or could not be read is masked out of the attention, never scored as a blank image.

- `BreastModel`: an image model of `models.create_model` (its pretrained weights, or an
  image-level run's best.pt through `--pretrained-path`) without its classifier, plus the
  attention and the head. `forward` takes (B, V, C, H, W) and keeps each view's attention
  weight in `last_attention`; `features` and `pool` are its two halves, so inference can read
  every view once, alone, and pool each breast's views afterwards (`breast_scores`).
- `BreastDataset`: one item per breast of the table (its prediction_id): its views read and
  augmented as `data.PngDataset` reads an image; in training every view of the breast by
  default (`views`: or a random CC and MLO each epoch, or a random number), in validation
  every view, as inference pools them. `collate_breasts` pads a batch to the most views one
  of its breasts has, with a constant (all-zero) input the model masks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError

LEVELS = ("image", "breast")
VIEWS = "all"             # views per breast read in training (validation: always all)
ATTENTION_HIDDEN = 128


def _module():
    import torch
    return torch.nn.Module


class BreastModel(_module()):
    """Backbone features per view -> gated attention over the views -> one linear head."""

    def __init__(self, backbone, outputs: int = 1, hidden: int = ATTENTION_HIDDEN):
        import torch
        super().__init__()
        self.backbone = backbone
        n = backbone.num_features
        self.attention_v = torch.nn.Linear(n, hidden)
        self.attention_u = torch.nn.Linear(n, hidden)
        self.attention_w = torch.nn.Linear(hidden, 1)
        self.head = torch.nn.Linear(n, outputs)
        self.num_features = n
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})
        self.channels_last = False
        self.last_attention = None

    def get_classifier(self):
        """What a fine-tune adds (backbones.head_modules, init_head): attention and head."""
        return (self.attention_v, self.attention_u, self.attention_w, self.head)

    def features(self, x):
        """(N, C, H, W) -> (N, F): the backbone's pooled features of each view."""
        import torch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def pool(self, feats, mask):
        """(B, V, F) features and a (B, V) mask of the views present -> ((B, outputs) logits,
        (B, V) attention weights, 0 where masked). A breast with no view present (never one of
        `BreastDataset`'s) gets equal weights, so its output stays finite."""
        import torch
        feats = feats.float()
        a = torch.tanh(self.attention_v(feats)) * torch.sigmoid(self.attention_u(feats))
        score = self.attention_w(a).squeeze(-1)                        # (B, V)
        mask = mask | ~mask.any(dim=1, keepdim=True)
        w = torch.softmax(score.masked_fill(~mask, float("-inf")), dim=1)
        return self.head((w.unsqueeze(-1) * feats).sum(dim=1)), w

    # Grad-CAM (`reports.heatmap.grad_cam`) reads one view as a breast of that view alone:
    # what in it raises the breast's logit
    def forward_features(self, x):
        return self.backbone.forward_features(x)

    def forward_head(self, feats):
        pooled = self.backbone.forward_head(feats)                    # (N, F): the classifier is gone
        return self.pool(pooled[:, None], pooled.new_ones(len(pooled), 1, dtype=bool))[0]

    @property
    def feature_info(self):
        """The backbone's feature stages, named from this module (for hooks)."""
        info = getattr(self.backbone, "feature_info", None)
        return None if info is None else [dict(d, module="backbone." + d["module"]) for d in info]

    def forward(self, x):
        """(B, V, C, H, W) -> (B, outputs); (B, C, H, W) is read as breasts of one view."""
        if x.ndim == 4:
            x = x[:, None]
        b, v = x.shape[:2]
        present = view_present(x)
        flat, keep = x.flatten(0, 1), present.flatten()
        if bool(keep.all()) or not bool(keep.any()):
            feats = self.features(flat)
        else:       # only the views present go through the backbone (and its BatchNorm's statistics)
            f = self.features(flat[keep])
            feats = f.new_zeros(len(flat), f.shape[1]).index_put((keep,), f)
        out, w = self.pool(feats.view(b, v, -1), present)
        self.last_attention = w.detach()
        return out


def view_present(x):
    """(B, V, C, H, W) -> (B, V) bool: the views whose input is not constant in some channel.
    An empty slot is all zeros before normalisation, so each channel is one constant after it
    (the constants differ between channels under ImageNet's mean / std), and after any
    intensity change or flip; no mammogram is."""
    flat = x.flatten(3)
    return (flat.amax(dim=3) > flat.amin(dim=3)).any(dim=2)


def create_breast_model(name: str, in_chans: int = 3, pretrained_path=None, global_pool: str = "gem",
                        drop_path: float = 0.0, outputs: int = 1, legacy_pool: bool = False):
    """A BreastModel on the timm backbone `name` (weights from `pretrained_path` as for an image
    model: timm files, `pypi`, or an image-level run's best.pt), the image model's pooling kept
    (GeM) and its classifier removed."""
    from rsna_utils.learn.models import create_model, init_head
    image = create_model(name, in_chans, pretrained_path, global_pool=global_pool,
                         drop_path=drop_path, legacy_pool=legacy_pool)
    report = getattr(image, "pretrained_report", None)
    drop_classifier(image)
    model = BreastModel(image, outputs)
    init_head(model)
    if report:
        model.pretrained_report = report
    return model.to(next(image.parameters()).device)


def drop_classifier(model) -> None:
    """The classifier replaced by an identity, the pooling kept (timm's reset_classifier(0)
    would rebuild the pooling too, dropping GeM)."""
    import torch

    from rsna_utils.learn.models import replace_classifier
    replace_classifier(model, torch.nn.Identity(), "the breast-level model needs a backbone with "
                       "a linear head (resnet, efficientnet, convnext)")


# ----------------------------------------------------------------------------------------
# Data: one item per breast
# ----------------------------------------------------------------------------------------

def breast_groups(df: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    """(prediction_ids in the table's order, the row positions of each)."""
    pos = pd.Series(np.arange(len(df)), index=df["prediction_id"].to_numpy())
    ids = list(dict.fromkeys(df["prediction_id"]))
    groups = pos.groupby(level=0, sort=False).apply(lambda s: s.to_numpy())
    return ids, [groups[i] for i in ids]


class BreastDataset:
    """((raw views (V, 1, H, W), intensity parameters (V, 3)), label) per breast, from the rows
    of `df` (preprocessed PNGs, `load_table`) grouped by prediction_id. Each view is read and
    augmented as `PngDataset(raw=True)` reads an image (the same `Augment`, drawn per view);
    the label is the breast's (any view with cancer), the auxiliary targets the mean of its
    views' known values. `choose` picks the views: one CC and one MLO when the breast has
    both (a random one of each in training), then other views of the breast, up to `views`:
    a number (2: the CC and the MLO), None or "all" (all of them, as validation and inference
    read them) or "random" (in training 1 to all, drawn per breast and epoch; all without
    augmentation). An item holds only the views read; `collate_breasts` pads a batch to the
    most views one of its breasts has, with zeros the model masks (its backbone runs on the
    views present only)."""

    def __init__(self, df: pd.DataFrame, size, channels: int = 3, augment=None, seed: int = 0,
                 cache: bool = False, label: str = "cancer", norm=None, aux: list | None = None,
                 views: int | str | None = VIEWS):
        from rsna_utils.learn.data import DEFAULT_NORM, PngDataset, aux_targets
        if aux and "view" in aux:
            raise RsnaError("aux target 'view' is per image; a breast-level model reads both "
                            "views: remove 'view' from aux for --level breast")
        self.images = PngDataset(df, size, channels, augment, seed, cache, label,
                                 norm or DEFAULT_NORM, raw=True)
        self.ids, self.rows = breast_groups(df)
        img_labels = self.images.labels
        self.labels = np.array([img_labels[r].max() for r in self.rows], np.float32)
        self.view = (df["view"].astype(str).str.upper().to_numpy() if "view" in df
                     else np.full(len(df), "", object))
        self.aux = None
        if aux:
            t = aux_targets(df, list(aux))
            with np.errstate(invalid="ignore"):
                self.aux = np.stack([_nanmean(t[r]) for r in self.rows]).astype(np.float32)
        # None / "all": every view of every breast (validation, as `rsna predict` pools them),
        # padded to the most views a breast has here; "random": up to that many
        most = max((len(r) for r in self.rows), default=1)
        if isinstance(views, str) and views.isdigit():
            views = int(views)
        if views not in (None, "all", "random") and not (isinstance(views, int) and views >= 1):
            raise RsnaError(f"breast views {views!r}: give a number of views >= 1, all or random")
        self.random_views = views == "random"
        self.views = most if views in (None, "all", "random") else views
        self.train = augment is not None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.images.set_epoch(epoch)

    def choose(self, b: int, rng: np.random.Generator | None = None) -> list[int]:
        """Row positions of the views read for breast `b` (at most `views`)."""
        rows = list(self.rows[b])
        picked = []
        for want in ("CC", "MLO"):
            these = [r for r in rows if self.view[r] == want]
            if these:
                picked.append(these[int(rng.integers(len(these)))] if rng is not None else these[0])
        rest = [r for r in rows if r not in picked]
        if rng is not None:
            rest = list(rng.permutation(rest))
        k = self.views
        if self.random_views and rng is not None:      # 1 to all of this breast's views
            k = int(rng.integers(1, len(rows) + 1))
        return (picked + rest)[:k]

    def __getitem__(self, b: int):
        import torch
        rng = self.images._rng() if self.train else None
        chosen = self.choose(b, rng)
        raws, params = [], []
        for r in chosen:
            (raw, p), _ = self.images[r]
            raws.append(raw)
            params.append(p)
        x = (torch.stack(raws), torch.stack(params))      # (V_b, 1, H, W), (V_b, 3)
        if self.aux is not None:
            return x, torch.from_numpy(np.concatenate([[self.labels[b]], self.aux[b]]).astype(np.float32))
        return x, torch.tensor(self.labels[b])

    def views_read(self) -> np.ndarray:
        """Views each breast is read with in training, in expectation ("random": (n + 1) / 2
        of its n views): what a training epoch passes through the backbone, per breast."""
        n = np.array([len(r) for r in self.rows], float)
        return training_views(n, "random" if self.random_views else self.views)

    def image_values(self, values: np.ndarray, n_rows: int) -> np.ndarray:
        """Per-breast values (in item order) -> one per row of the table: each view of a breast
        carries its breast's value (so a mean over the views gives it back)."""
        out = np.full(n_rows, np.nan, np.float32)
        for b, rows in enumerate(self.rows):
            out[rows] = values[b]
        return out


def training_views(n, views) -> np.ndarray:
    """Views read in training, in expectation, from breasts of `n` views each (an array) under
    `views` (`BreastDataset`'s: a number, "all"/None or "random")."""
    n = np.asarray(n, float)
    if views in (None, "all"):
        return n
    if views == "random":
        return (n + 1) / 2
    return np.minimum(n, int(views))


def collate_breasts(batch):
    """Breast items of different view counts -> one batch, ((B, V, 1, H, W) raw, (B, V, 3)
    intensity parameters), label (B, ...): each breast padded to the batch's most views (not
    the table's: a breast of 8 views in the table no longer makes every batch 8 views wide)
    with zeros and no intensity change, the slots `BreastModel` masks."""
    import torch
    from torch.utils.data import default_collate

    from rsna_utils.learn.augment import NO_INTENSITY
    v = max(raw.shape[0] for (raw, _), _ in batch)
    padded = []
    for (raw, p), y in batch:
        k = v - raw.shape[0]
        if k:
            raw = torch.cat([raw, raw.new_zeros((k, *raw.shape[1:]))])
            p = torch.cat([p, torch.from_numpy(NO_INTENSITY).to(p.dtype).expand(k, -1)])
        padded.append(((raw, p), y))
    return default_collate(padded)     # in a worker: straight into shared memory


def _nanmean(a: np.ndarray) -> np.ndarray:
    known = ~np.isnan(a)
    s = np.where(known, a, 0).sum(axis=0)
    n = known.sum(axis=0)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


# ----------------------------------------------------------------------------------------
# Inference: every view read once, each breast's views pooled afterwards
# ----------------------------------------------------------------------------------------

POOL_CHUNK = 512           # breasts pooled per call of the attention (inference)


def breast_scores(model, feats: np.ndarray, readable: np.ndarray, prediction_ids, device,
                  chunk: int = POOL_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(probability per row, attention per row): the views of each breast (rows sharing a
    prediction_id, `readable` ones only) pooled by `model` from their features (N, F), every
    row of a breast given its breast's probability. NaN where a row was not read, and for
    every row of a breast none of whose views was read (the caller reports those).
    `BreastStream` gives the same values while the rows are still being read."""
    pid = np.asarray(prediction_ids)
    idx = np.flatnonzero(np.asarray(readable, bool))
    rows = [s.to_numpy() for _, s in pd.Series(idx).groupby(pid[idx], sort=False)]
    prob = np.full(len(pid), np.nan, np.float32)
    att = np.full(len(pid), np.nan, np.float32)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        p, w = pool_breasts(model, [feats[r] for r in part], device)
        for i, r in enumerate(part):
            prob[r], att[r] = p[i], w[i, :len(r)]
    return prob, att


def pool_breasts(model, views: list, device) -> tuple[np.ndarray, np.ndarray]:
    """One call of the attention on breasts given as their views' features ((V_b, F) each):
    ((B,) probability, (B, V) attention weights, the breasts padded to the most views)."""
    import torch
    v = max(len(f) for f in views)
    f = np.zeros((len(views), v, views[0].shape[1]), np.float32)
    m = np.zeros((len(views), v), bool)
    for i, x in enumerate(views):
        f[i, :len(x)], m[i, :len(x)] = x, True
    with torch.inference_mode():
        out, w = model.pool(torch.from_numpy(f).to(device), torch.from_numpy(m).to(device))
        p = torch.sigmoid(out[:, 0].float()).cpu().numpy()      # logit 0: the cancer
        w = w.float().cpu().numpy()
    return p, w


class BreastStream:
    """`breast_scores` while the rows are read: each breast is pooled as soon as every row of it
    (readable or not) has been seen, and its views' features are dropped, so what is held does
    not grow with the test set: the breasts waiting for a view still to come (with test.csv's
    order, a patient's rows together, a few), plus at most `chunk` finished ones (512 breasts:
    about 1,200 views, 3.6 MB of ConvNeXt-small features with the flip). The breasts
    are pooled in the chunks `breast_scores` makes (in the order of their first readable row,
    `chunk` at a time), so every value is the same, bit for bit. `add` the rows in order (one
    batch at a time, features (n, K, F): K = 2 with the flip, each pooled apart), then `finish`
    for the (K, N) probabilities and attention weights, NaN where not read.
    `hold_all`: pool nothing until `finish`, every feature kept (the behaviour before issue 41;
    benchmarks/predict_memory.py measures both)."""

    hold_all = False

    def __init__(self, model, prediction_ids, device, chunk: int | None = None):
        from collections import Counter, deque
        self.model, self.device, self.chunk = model, device, chunk or POOL_CHUNK
        self.pid = np.asarray(prediction_ids)
        self.left = Counter(self.pid.tolist())     # rows of each breast not seen yet
        self.queue = deque()                       # breasts with a readable view, in first-read order
        self.views: dict = {}                      # breast -> ([rows], [(K, F) features])
        self.ready: list = []                      # finished breasts, waiting for a full chunk
        self.prob = self.att = None
        self.seen = 0
        self.peak_held = 0                         # most rows' features held at once

    def add(self, rows, feats: np.ndarray, readable) -> None:
        """Rows `rows` (positions in the table, in order) with their features (n, K, F);
        `readable[j]` False: row j was not read (its features are ignored)."""
        if self.prob is None:
            k = feats.shape[1]
            self.prob = np.full((k, len(self.pid)), np.nan, np.float32)
            self.att = np.full((k, len(self.pid)), np.nan, np.float32)
        for j, r in enumerate(rows):
            b = self.pid[r]
            if readable[j]:
                if b not in self.views:
                    self.views[b] = ([], [])
                    self.queue.append(b)
                self.views[b][0].append(r)
                self.views[b][1].append(feats[j].copy())    # not a view: the batch goes
                self.seen += 1
            self.left[b] -= 1
        self.peak_held = max(self.peak_held, self.seen)
        if not self.hold_all:
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        while self.queue and (final or self.left[self.queue[0]] == 0):
            self.ready.append(self.queue.popleft())
            if len(self.ready) == self.chunk:
                self._pool()
        if final and self.ready:
            self._pool()

    def _pool(self) -> None:
        import torch
        done = [self.views.pop(b) for b in self.ready]
        self.ready = []
        kind = torch.device(self.device).type
        for k in range(self.prob.shape[0]):
            views = [np.stack([f[k] for f in feats]).astype(np.float32) for _, feats in done]
            # float32 as at the end of the run before: `add` may be called under the backbone's
            # autocast, which must not reach the attention
            with torch.autocast(kind, enabled=False):
                p, w = pool_breasts(self.model, views, self.device)
            for i, (rows, _) in enumerate(done):
                self.prob[k, rows], self.att[k, rows] = p[i], w[i, :len(rows)]
        self.seen -= sum(len(rows) for rows, _ in done)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, N) probabilities and attention weights of every row; NaN where not read."""
        if self.prob is None:                     # no row given
            empty = np.full((1, len(self.pid)), np.nan, np.float32)
            return empty, empty.copy()
        self._drain(final=True)
        return self.prob, self.att
