"""The contract between training and inference: what a trained model is (architecture and
heads, input size, channels, normalisation, the PNG -> input resize, preprocessing, TTA, its
training recipe) and how a checkpoint is saved and loaded. `Checkpoint` (with its `InputSpec`)
is the one typed form of the file and the one place its keys' defaults are spelled: training
saves through it (`model_contract`, `Checkpoint.save`); inference, heatmaps and the ONNX export
load through it (`Checkpoint.load`, `load_checkpoints`, `checkpoint_recipe`) without importing
the training loop. The file stays the dict of tensors and plain settings 0.2 wrote (same keys),
and a file written by 0.2 or earlier loads, every missing key at its default."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
from rsna_utils.learn.data import DEFAULT_NORM  # older checkpoints' mean / std
from rsna_utils.learn.train_config import TrainConfig

# The resize from the PNG to the model input, the same in training (data.PngDataset) and
# inference (data.raw_batch): `roi.resize` in "pad" mode (aspect kept, black right/bottom),
# OpenCV area filter when shrinking, linear when enlarging. Stored in every checkpoint.
INPUT_RESIZE = {"mode": "pad", "filter": "area_shrink_linear_enlarge"}
DEFAULT_PRIOR = 0.021   # share of positive breasts in the RSNA training data
LEVELS = ("image", "breast")


def _hw(size) -> tuple[int, int]:
    """A stored input size as (h, w) ints: [h, w], (h, w), 256 or "1024x512"; (0, 0) unknown."""
    if size is None or (isinstance(size, (list, tuple, str)) and not size):
        return (0, 0)
    if isinstance(size, str):
        return tuple(parse_size(size, MIN_MODEL_SIDE))
    if isinstance(size, (int, float)):
        return (int(size), int(size))
    try:
        h, w = size
        return (int(h), int(w))
    except (TypeError, ValueError):
        raise RsnaError(f"checkpoint input size {size!r}: expected [height, width]; retrain, or "
                        "store the size as a list of two ints") from None


@dataclass(frozen=True)
class InputSpec:
    """What a model reads: its input size (h, w), channels, the normalisation mean / std, the
    PNG -> input resize rule and its level (an image, or a breast's views). Normalised when
    made: size a (h, w) tuple of ints, norm ((mean...), (std...)) of floats (also read from
    {"mean": [...], "std": [...]}, the spelling of the first ONNX contracts)."""
    size: tuple = (0, 0)
    channels: int = 3
    norm: tuple = DEFAULT_NORM
    resize: dict = field(default_factory=lambda: dict(INPUT_RESIZE))  # not stored before: pad
    level: str = "image"

    KEYS = ("channels", "size", "norm", "resize", "level")   # the checkpoint keys it reads

    def __post_init__(self):
        norm = self.norm if self.norm else DEFAULT_NORM
        if isinstance(norm, dict):
            norm = (norm["mean"], norm["std"])
        object.__setattr__(self, "size", _hw(self.size))
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "norm", tuple(tuple(float(v) for v in row) for row in norm))
        object.__setattr__(self, "resize", dict(self.resize or INPUT_RESIZE))
        object.__setattr__(self, "level", str(self.level))

    @classmethod
    def from_checkpoint(cls, ck: dict) -> "InputSpec":
        """The spec a checkpoint dict stores; a key it lacks (an older file) at its default. A
        size not stored: the preprocessing's (the PNG size), as before."""
        kw = {k: ck[k] for k in ("channels", "level") if ck.get(k) is not None}
        kw.update({k: ck[k] for k in ("norm", "resize") if ck.get(k)})
        size = ck.get("size") or (ck.get("preprocess") or {}).get("size")
        if size:
            kw["size"] = size
        return cls(**kw)

    def to_dict(self) -> dict:
        """The checkpoint keys, as `rsna train` has stored them: lists, not tuples."""
        return {"channels": self.channels, "size": list(self.size),
                "norm": [list(self.norm[0]), list(self.norm[1])], "resize": dict(self.resize),
                "level": self.level}


# keys only a resumable last.pt holds (best.pt and exports leave them out)
RESUME_ONLY = ("optimizer", "scheduler", "ema")


@dataclass
class Checkpoint:
    """A checkpoint of `rsna train`: the weights, the model (name, pooling, aux heads), its
    input (`InputSpec`), the preprocessing of its PNGs, the tuned threshold and the training
    prior, the TrainConfig it was trained with, and, where training wrote them, the epoch,
    metrics, history, best epoch and the optimiser / schedule / EMA state to resume from.
    `load` gives every key an older file lacks its default here; keys this version does not
    know are kept in `extra` and written back."""
    model: dict                              # the state_dict
    model_name: str
    input: InputSpec = field(default_factory=InputSpec)
    preprocess: dict = field(default_factory=dict)
    global_pool: str = "avg"
    aux: list = field(default_factory=list)
    threshold: float = 0.5
    prior: float = DEFAULT_PRIOR
    config: dict | None = None               # the TrainConfig (asdict)
    epoch: int | None = None
    metrics: dict | None = None
    history: list = field(default_factory=list)
    best: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    ema: dict | None = None
    extra: dict = field(default_factory=dict)

    FIELDS = ("model", "model_name", "preprocess", "global_pool", "aux", "threshold", "prior",
              "config", "epoch", "metrics", "history", "best", *RESUME_ONLY)

    @classmethod
    def from_dict(cls, ck: dict, path: str | Path = "checkpoint") -> "Checkpoint":
        """A checkpoint dict as torch.load gives it (0.2's or older); a missing or None key at
        its default."""
        if not isinstance(ck, dict) or "model" not in ck or "model_name" not in ck:
            raise RsnaError(f"{path}: not a checkpoint of `rsna train` (no 'model' and "
                            f"'model_name'); {TRAIN_FIX}")
        kw = {k: ck[k] for k in cls.FIELDS if ck.get(k) is not None}
        extra = {k: v for k, v in ck.items() if k not in cls.FIELDS and k not in InputSpec.KEYS}
        return cls(input=InputSpec.from_checkpoint(ck), extra=extra, **kw)

    def to_dict(self) -> dict:
        """The dict `torch.save` writes: the keys 0.2 wrote. The resume-only state only where
        there is an optimiser (last.pt); training's fields only where set."""
        d = {"model": self.model}
        if self.optimizer is not None:
            d.update(optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema)
        for k in ("epoch", "config"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d.update({"preprocess": self.preprocess, "model_name": self.model_name,
                  **self.input.to_dict(), "global_pool": self.global_pool,
                  "aux": list(self.aux), "threshold": self.threshold})
        if self.metrics is not None:
            d["metrics"] = self.metrics
        d["prior"] = self.prior
        if self.epoch is not None:
            d["history"] = self.history
        if self.best is not None:
            d["best"] = self.best
        return {**d, **self.extra}

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """`read_checkpoint(path)` as a Checkpoint; a one-line error for what is not one."""
        return cls.from_dict(read_checkpoint(path), path)

    def save(self, path: str | Path) -> None:
        """Atomic (`save_checkpoint`): a kill leaves the old file intact."""
        save_checkpoint(self.to_dict(), path)

    def without_resume_state(self, model: dict | None = None) -> "Checkpoint":
        """best.pt of this last.pt: no optimiser, schedule or EMA, with `model`'s weights."""
        return dataclasses.replace(self, model=self.model if model is None else model,
                                   optimizer=None, scheduler=None, ema=None)


def cancer_probability(model, x, tta: bool = False):
    """The model's cancer probability for the batch `x` (N, C, H, W); with `tta` the mean of
    the image's and its mirror's (`mirrored`). The one flip-TTA scoring: training's validation
    and inference call it."""
    import torch
    p = torch.sigmoid(cancer_logit(model(x)))
    if tta:
        p = (p + torch.sigmoid(cancer_logit(model(mirrored(x))))) / 2
    return p


def mirrored(x):
    """The horizontal mirror of a batch (N, C, H, W) or of maps (N, H, W): the last axis."""
    import torch
    return torch.flip(x, dims=[x.ndim - 1])


def cancer_logit(out):
    """The cancer logit of a model's output: (N,) or column 0 of (N, 1 + aux)."""
    out = out.float()
    return out[:, 0] if out.ndim == 2 else out.view(-1)


def model_contract(cfg: TrainConfig) -> dict:
    """What inference rebuilds the model and its input from, stored in every checkpoint: the
    architecture and its heads, the input (size, channels, the backbone's mean / std, the
    resize from PNG to input) and the preprocessing (cfg.data's preprocess.json) that test
    DICOMs go through. Checks the model name (timm) before any data is read."""
    spec = InputSpec(parse_size(cfg.size, MIN_MODEL_SIDE), cfg.channels,
                     _input_norm(cfg.model, cfg.pretrained_path), INPUT_RESIZE, cfg.level)
    return {"preprocess": _preprocess_config(Path(cfg.data)), "model_name": cfg.model,
            **spec.to_dict(), "global_pool": cfg.global_pool, "aux": list(cfg.aux)}


def _input_norm(model_name: str, pretrained_path=None):
    """The backbone's pretrained mean / std, stored in the checkpoint: a weights folder's own
    config.json when it says (the tag it was exported from), else timm's config of the name."""
    try:
        from rsna_utils.learn.models import input_norm
        from rsna_utils.learn.weights import folder_norm
    except ImportError:
        return DEFAULT_NORM
    return folder_norm(pretrained_path) or input_norm(model_name)


def _preprocess_config(data: Path) -> dict:
    from rsna_utils.image.convert import with_later_settings
    p = data / "preprocess.json"
    if p.exists():
        return with_later_settings(json.loads(p.read_text()))
    return {}


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Atomic: written to a temporary name, then renamed; a kill leaves the old file intact."""
    import torch
    write_atomic(path, lambda tmp: torch.save(obj, tmp),
                 "Free some space or give --out a folder on a larger disk; --resume continues "
                 "from the last last.pt saved", doing="saving the checkpoint")


CONFIG_FILE = "config.json"


# config.json fields that vary between the runs of one recipe and do not change the model
PER_RUN_FIELDS = frozenset({"fold", "out", "resume", "overwrite", "progress", "workers", "device",
                            "cache"})
# Input paths: a recipe keeps their last part only. The PNG folder's name is what tells two
# preprocessings apart (png_roi, png_stretch); where it lies is not the recipe, so folds trained
# in a clone and on /kaggle/input are one recipe. Two recipes whose folders share a name and
# whose folds overlap are refused by `rsna oof` (each image once per model).
LOCATION_FIELDS = ("data", "csv", "pretrained_path")


_FOLD_RE = re.compile(r"^(?P<stem>.*?)[_\-.]?fold[_\-]?(?P<fold>\d+)$", re.IGNORECASE)


def _train_defaults() -> dict:
    """TrainConfig's fields at their defaults, as config.json spells them."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(TrainConfig)}


def read_run_config(run: Path) -> dict | None:
    path = run / CONFIG_FILE
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: not valid JSON ({e}); restore it from the run or delete it to "
                        "name the model from the folder") from None
    if not isinstance(cfg, dict):
        raise RsnaError(f"{path}: expected a JSON object (the TrainConfig); restore it or delete "
                        "it to name the model from the folder")
    return cfg


def folder_model_fold(run: Path) -> tuple[str, int | None]:
    """`effb3/fold2`, `effb3_fold2` -> ("effb3", 2); `myrun` -> ("myrun", None)."""
    m = _FOLD_RE.match(run.name)
    if not m:
        return run.name, None
    stem = m.group("stem") or run.parent.name or run.name
    return stem, int(m.group("fold"))


def recipe_key(cfg: dict | None, run: Path) -> tuple[str, str]:
    """(key, name) of the model a run trains: its config.json without the per-run fields (the
    folds of one recipe share it), else the folder name. `predict` groups its checkpoints by
    the same key, so inference weighs models as the OOF merge does."""
    if cfg is not None:
        # a field added since the run was trained counts at its default (its behaviour then)
        recipe = {k: v for k, v in {**_train_defaults(), **cfg}.items() if k not in PER_RUN_FIELDS}
        try:       # a run written before sizes were normalised: 256 or "1024x512" as [h, w]
            recipe["size"] = list(parse_size(recipe["size"], MIN_MODEL_SIDE))
        except (RsnaError, KeyError):
            pass
        name = str(cfg.get("model", folder_model_fold(run)[0]))
        return "config:" + json.dumps(_unlocated(recipe), sort_keys=True, default=str), name
    folder_model = folder_model_fold(run)[0]
    return "folder:" + folder_model, folder_model


def _unlocated(recipe: dict) -> dict:
    """The recipe with each input path (LOCATION_FIELDS) cut to its last part."""
    out = dict(recipe)
    for k in LOCATION_FIELDS:
        v = out.get(k)
        if isinstance(v, str) and ("/" in v or "\\" in v):
            out[k] = v.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or v
    return out


def canonical_recipe(key):
    """A recipe key as this version writes it. Keys written by 0.2 (in an exported ensemble.json:
    "recipes", "recipe_weights") hashed the whole input paths; their paths are cut here as
    `recipe_key` cuts them, so those files still weigh and name the same checkpoints."""
    if not isinstance(key, str) or not key.startswith("config:"):
        return key
    try:
        recipe = json.loads(key[len("config:"):])
    except json.JSONDecodeError:
        return key
    if not isinstance(recipe, dict):
        return key
    return "config:" + json.dumps(_unlocated(recipe), sort_keys=True, default=str)


def checkpoint_recipe(path: str | Path, stored: dict | None, exported=None) -> str:
    """The recipe key of a checkpoint as `rsna oof` keys its run: the run folder's config.json
    when it sits beside the checkpoint (a resume rewrites it, e.g. with more epochs), else
    `exported(path)` (inference passes the key an exported ensemble.json beside it recorded,
    `infer.ensemble.exported_recipe`), else the TrainConfig stored in the checkpoint."""
    run = Path(path).parent
    try:
        cfg = read_run_config(run)
    except RsnaError as e:          # a run killed while writing it: the checkpoint still says
        print(f"warning: {e}; using the training settings stored in {path}", file=sys.stderr)
        cfg = None
    if cfg is None and exported is not None:
        key = exported(Path(path))
        if key:
            return canonical_recipe(key)
    return recipe_key(cfg or stored, run)[0]


@dataclass
class LoadedModel:
    model: object
    name: str
    path: str
    threshold: float
    prior: float
    size: tuple = (0, 0)     # the model's input (height, width)
    norm: tuple = DEFAULT_NORM   # input mean / std (stored at training: `InputSpec.norm`)
    channels: int = 3
    recipe: str = ""         # the training recipe (`recipe_key`): folds of one recipe share it
    recipe_weight: float | None = None   # the recipe's vote in an ensemble (None: equal)
    level: str = "image"     # breast: a `breast.BreastModel`, scored per breast (`breast_scores`)
    input: InputSpec | None = None   # the checkpoint's: when given, size, norm, channels, level

    def __post_init__(self):
        if self.input is not None:      # the input contract read from one place
            self.use_input(self.input)

    @property
    def spec(self) -> InputSpec:
        """The input this model reads: the checkpoint's `InputSpec`, else one of the fields."""
        return self.input if self.input is not None else InputSpec(
            self.size, self.channels, self.norm, level=self.level)

    def use_input(self, spec: InputSpec) -> None:
        """Read `spec` from now on (size, norm, channels, level: what its batches are made of)."""
        self.input = spec
        self.size, self.norm = spec.size, spec.norm
        self.channels, self.level = spec.channels, spec.level


TRAIN_FIX = "pass a best.pt (or last.pt) written by `rsna train`, e.g. runs/<name>/best.pt"


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint of `rsna train` as saved (tensors and plain settings), or one line that
    says what the file is instead: missing, a folder, pretrained backbone weights, something
    that is not a PyTorch file at all."""
    from rsna_utils.learn.weights import load_weights
    path = Path(path)
    if path.is_dir():
        hint = f"; it holds {path / 'best.pt'}" if (path / "best.pt").is_file() else ""
        raise RsnaError(f"{path}: a folder, not a checkpoint{hint}; {TRAIN_FIX}")
    if not path.is_file():
        raise RsnaError(f"{path}: checkpoint not found; {TRAIN_FIX}")
    try:
        ck = load_weights(path)
    except RsnaError as e:
        raise RsnaError(f"{path}: not a checkpoint of `rsna train`: {file_kind(path)} "
                        f"({str(e).partition(': ')[2][:160]}); {TRAIN_FIX}") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_name" not in ck:
        what = ("tensors without the training settings (pretrained backbone weights? those go "
                "to --pretrained-path)" if isinstance(ck, dict) else f"a {type(ck).__name__}")
        raise RsnaError(f"{path}: not a checkpoint of `rsna train`: {what}; {TRAIN_FIX}")
    return ck


def file_kind(path: Path) -> str:
    """What a file looks like from its first bytes, in words, for an error message."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "an empty file (a copy cut short?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that torch cannot read (damaged, or another program's)"
    if head[:1] == b"\x80":
        return "a pickle that is not a tensor checkpoint"
    if head[:1] in (b"{", b"[") or head.startswith((b"<", b"#", b"\xef\xbb\xbf")):
        return "a text file (JSON, HTML or a note), not a PyTorch file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"a text file starting {head[:12].decode(errors='replace')!r}, not a PyTorch file"
    return f"{path.stat().st_size:,} bytes that are no PyTorch or safetensors file"


def load_checkpoints(paths: list[str | Path], device,
                     exported=None) -> tuple[list[LoadedModel], dict]:
    """Models and the one preprocessing config they share (an ensemble must agree on it). The
    input contract comes from each checkpoint (`model_contract`): size, channels, mean /
    std, and the PNG -> input resize, which must be the one this version applies."""
    from rsna_utils.image.convert import with_later_settings
    from rsna_utils.learn.models import create_model, set_outputs
    if not paths:
        raise RsnaError("no checkpoint given; pass --checkpoints runs/<name>/best.pt")
    models, pre, shape = [], None, None
    for p in paths:
        ck = Checkpoint.load(p)
        spec = ck.input
        this_pre = with_later_settings(dict(ck.preprocess))
        this_shape = spec.channels
        if pre is not None and (this_pre != pre or this_shape != shape):
            raise RsnaError(f"{p}: preprocessing or channels differ from {paths[0]}; an "
                            "ensemble must share them (train on the same PNG folder)")
        pre, shape = this_pre, this_shape
        if spec.resize != INPUT_RESIZE:
            raise RsnaError(f"{p}: trained with the input resize {spec.resize}, but this version "
                            f"resizes as {INPUT_RESIZE}; predict with the rsna_utils version "
                            "that trained it, or retrain")
        level = spec.level
        if level not in LEVELS:
            raise RsnaError(f"{p}: level {level!r} is not one this version reads (image, "
                            "breast); predict with the rsna_utils version that trained it")
        if level == "breast":
            from rsna_utils.learn.breast import create_breast_model
            model = create_breast_model(ck.model_name, spec.channels, global_pool=ck.global_pool,
                                        outputs=1 + len(ck.aux), legacy_pool=True)
            model.channels_last = True
        else:
            model = create_model(ck.model_name, spec.channels, global_pool=ck.global_pool,
                                 legacy_pool=True)
            if ck.aux:
                set_outputs(model, 1 + len(ck.aux))       # logit 0 is the cancer
        try:
            model.load_state_dict(ck.model)
        except RuntimeError as e:
            raise RsnaError(f"{p}: its weights do not fit a {ck.model_name!r} model "
                            f"({str(e).splitlines()[0][:160]}); the checkpoint is damaged or "
                            "mislabelled") from None
        model.to(device).eval()
        models.append(LoadedModel(model, ck.model_name, str(p), float(ck.threshold),
                                  float(ck.prior),
                                  recipe=checkpoint_recipe(p, ck.config, exported), input=spec))
    if not pre:
        raise RsnaError(f"{paths[0]}: the checkpoint carries no preprocessing settings (trained on "
                        "PNGs without preprocess.json); retrain from `rsna preprocess` output")
    return models, pre


def in_chans(model) -> int | None:
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
    return None
