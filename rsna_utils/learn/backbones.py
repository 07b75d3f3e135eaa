"""The timm backbones this project names, and what a fine-tune adds on top of one (the
classifier, GeM pooling): shared by the model builder and the pretrained-weights loader."""
from __future__ import annotations

import functools

from rsna_utils.core.errors import RsnaError

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


@functools.cache                 # one class, so that isinstance() finds it
def gem_class():
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
    return gem_class()(p, flatten=flatten)


def head_modules(model) -> list:
    """The modules that a fine-tune adds on top of the pretrained backbone: the classifier
    (timm's get_classifier(), which set_outputs widens for the auxiliary targets) and any GeM
    pooling (its learnable p)."""
    return classifiers(model) + [m for m in model.modules() if isinstance(m, gem_class())]


def classifiers(model) -> list:
    """timm's get_classifier() as a list of modules: one layer, none (Identity / None), or a tuple
    of heads (DeiT distilled: the class head and the distillation head)."""
    import torch
    head = model.get_classifier()
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, torch.nn.Module)]


POOLS = ("avg", "max", "avgmax", "catavgmax", "gem")
