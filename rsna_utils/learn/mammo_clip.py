"""Mammo-CLIP's image encoders as timm backbones: `rsna weights import --from mammo-clip`.

Mammo-CLIP (Ghosh et al., MICCAI 2024, github.com/batmanlab/Mammo-CLIP) pretrains EfficientNet
image encoders on screening mammograms and their reports. Its checkpoints
(`b2-model-best-epoch-10.tar`, `b5-model-best-epoch-7.tar`) hold
{"model": <the CLIP state dict>, "config": {...}, "optimizer": ..., "epoch": ...}; the image
encoder sits under `image_encoder.` in the layout of efficientnet-pytorch
(lukemelas/EfficientNet-PyTorch: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...; Mammo-CLIP
removed its `_fc`). Its config names the B2 encoder `tf_efficientnetv2-detect`, but it is an
EfficientNet-B2 (not V2) and the B5 one `tf_efficientnet_b5_ns-detect`.

The import reads such a file (or a plain efficientnet-pytorch state dict, with or without a key
prefix) with `torch.load(weights_only=True)` (pickled code refused; a Hydra/OmegaConf config
pickled beside the tensors is read as inert stubs, see read_checkpoint), tells B0..B7 apart by
the tensor shapes, renames the tensors to timm's `tf_efficientnet_bN` (TF "same" padding and
BatchNorm eps 1e-3, as efficientnet-pytorch), drops any classifier, and writes the Hugging Face
layout folder that
`--pretrained-path DIR` loads (rsna_utils.learn.weights.write_hf_folder). Its config.json names
the timm model (`architecture`) and Mammo-CLIP's input normalisation (grey values scaled to
[0, 1], mean 0.3089, std 0.2505 on every channel), which training then uses for the input.

One difference stays: efficientnet-pytorch, as Mammo-CLIP builds it (`from_pretrained`), pads
its stride-2 convolutions statically, for its default image size (260 px for B2, 456 for B5),
whatever the input; timm pads for the actual input (TensorFlow's "same"). Where the input's
parity at a stride-2 layer differs from that size's (a few layers for a 1520x912 mammogram), the
padding, and so that layer's sampling grid, moves by one pixel: the same weights, slightly
different features, which fine-tuning is expected to absorb (not measured on the real weights).
"""
from __future__ import annotations

import re
from pathlib import Path

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.weights import WRAPPER_KEYS, load_weights, write_hf_folder

STEM = "_conv_stem.weight"
# Mammo-CLIP's input: grey values min-max scaled to [0, 1], then (x - mean) / std, the grey
# image repeated on 3 channels (its configs' base.mean / base.std); base.image_size_h/w
MAMMO_CLIP_MEAN, MAMMO_CLIP_STD = 0.3089279, 0.25053555408335154
# (stem channels, head channels, blocks) of EfficientNet-B0..B7, the same in efficientnet-pytorch
# and timm (tests/learn/test_mammo_clip.py checks this table against timm)
VARIANTS = {(32, 1280, 16): 0, (32, 1280, 23): 1, (32, 1408, 23): 2, (40, 1536, 26): 3,
            (48, 1792, 32): 4, (48, 2048, 39): 5, (56, 2304, 45): 6, (64, 2560, 55): 7}
# efficientnet-pytorch module -> timm module, outside the blocks (`_fc`, the classifier, dropped)
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
DROPPED = ("_fc.",)
# inside a block: with an expansion conv (timm's InvertedResidual) or without (B0..B7's first
# stage, timm's DepthwiseSeparableConv)
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
FIX = ("pass a Mammo-CLIP checkpoint (b2-model-best-epoch-10.tar or b5-model-best-epoch-7.tar "
       "from huggingface.co/shawn24/Mammo-CLIP) or an efficientnet-pytorch EfficientNet-B0..B7 "
       "state dict")
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


# Classes a training script pickles beside its tensors as configuration (Hydra's OmegaConf
# containers, typing markers, paths, numpy scalars, plain types). A checkpoint refused by the
# weights-only loader for these alone is read again with each of them replaced by ConfigStub:
# still torch.load(weights_only=True), nothing imported from the file, no code of it run.
CONFIG_GLOBALS = ("omegaconf.", "typing.", "pathlib.", "numpy.core.multiarray.scalar",
                  "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.")
CONFIG_BUILTINS = frozenset(f"builtins.{t}" for t in (
    "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "complex",
    "bool", "object", "type", "NoneType"))


class ConfigStub:
    """Stands in for a configuration object of a checkpoint: keeps what the file gave it
    (arguments, state) and does nothing else."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else ""


def _is_config(name: str) -> bool:
    return name in CONFIG_BUILTINS or name.startswith(CONFIG_GLOBALS)


def read_checkpoint(path: Path):
    """torch.load(weights_only=True) through the package's loader (pickled code refused, one-line
    errors); a file refused only for configuration classes pickled beside the tensors (Hydra's
    OmegaConf config in a training checkpoint) is read with those replaced by ConfigStub."""
    import torch
    try:
        return load_weights(path)
    except RsnaError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: the first error stands
            names = []
        if not names or not all(_is_config(n) for n in names):
            raise
    with torch.serialization.safe_globals([(ConfigStub, n) for n in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the second read is one line
            raise RsnaError(f"{path}: unreadable checkpoint: its configuration objects "
                            f"({_names(names, 3)}) could not be read as plain data "
                            f"({type(e).__name__}: {_first_line(e)}); where the file is "
                            "trusted, save its state dict alone (torch.save(ckpt['model'], "
                            "'clip.pth')) and import that") from None


def _names(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more if keys else "none"


def _levels(obj):
    """The dict itself and the dicts its wrapper keys (state_dict, model, module) open, in order."""
    for _ in range(4):
        if not isinstance(obj, dict):
            return
        yield obj
        obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)


def find_image_encoder(obj, origin: str) -> tuple[dict, str, int]:
    """(the efficientnet-pytorch tensors with their prefix removed, the prefix, how many other
    tensors were left out: Mammo-CLIP's text encoder and projections) of a loaded checkpoint."""
    import torch
    if not isinstance(obj, dict):
        raise RsnaError(f"{origin}: holds a {type(obj).__name__}, not a checkpoint dict; {FIX}")
    tensors: dict = {}
    for level in _levels(obj):
        tensors = {k: v for k, v in level.items() if isinstance(k, str) and torch.is_tensor(v)}
        if any(k == STEM or k.endswith("." + STEM) for k in tensors):
            break
    prefixes = sorted({k[:-len(STEM)] for k in tensors if k == STEM or k.endswith("." + STEM)})
    if not prefixes:
        top = ", ".join(map(str, list(obj)[:6])) or "none"
        timm_like = [k for k in tensors
                     if k == "conv_stem.weight" or k.endswith(".conv_stem.weight")]
        hint = (f"; {timm_like[0]!r} is timm's naming already: a file of only that backbone "
                "goes to --pretrained-path as it is" if timm_like else "")
        raise RsnaError(f"{origin}: not a Mammo-CLIP / efficientnet-pytorch checkpoint: no "
                        f"'{STEM}' among its {len(tensors)} tensors (keys found: "
                        f"{_names(tensors)}; top-level keys: {top}){hint}; {FIX}")
    if len(prefixes) > 1:
        chosen = [p for p in prefixes if p.endswith("image_encoder.")]
        if len(chosen) != 1:
            raise RsnaError(f"{origin}: holds {len(prefixes)} EfficientNets (key prefixes "
                            f"{_names(repr(p) for p in prefixes)}) and none is the one "
                            "`image_encoder.`; save the one to import as its own state dict")
        prefixes = chosen
    prefix = prefixes[0]
    encoder = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return encoder, prefix, len(tensors) - len(encoder)


def _describe(sig: tuple[int, int, int], se: bool) -> str:
    stem, head, blocks = sig
    kind = "" if se else ", without squeeze-excitation (an EfficientNet-Lite?)"
    return (f"an efficientnet-pytorch network with a {stem}-channel stem, a {head}-channel head "
            f"and {blocks} blocks{kind}")


def detect_variant(encoder: dict, origin: str) -> int:
    """N of the EfficientNet-BN that `encoder` (efficientnet-pytorch names) holds, told from its
    shapes: stem and head widths, number of blocks, squeeze-excitation present."""
    for key in (STEM, "_conv_head.weight"):
        if key not in encoder or encoder[key].ndim != 4:
            raise RsnaError(f"{origin}: the EfficientNet lacks {key!r} (keys found: "
                            f"{_names(encoder)}); the file is cut short or not an efficientnet-"
                            f"pytorch network; {FIX}")
    blocks = {int(m.group(1)) for k in encoder if (m := _BLOCK.match(k))}
    sig = (encoder[STEM].shape[0], encoder["_conv_head.weight"].shape[0], len(blocks))
    se = any("._se_reduce." in k for k in encoder)
    n = VARIANTS.get(sig)
    if n is None or not se:
        lite = ("; EfficientNet-Lite weights in this layout load directly: --model "
                "tf_efficientnet_liteN --pretrained-path FILE" if not se else "")
        raise RsnaError(f"{origin}: holds another architecture: {_describe(sig, se)}; expected "
                        "EfficientNet-B0..B7 in efficientnet-pytorch layout (Mammo-CLIP's are B2 "
                        f"and B5); {FIX}{lite}")
    return n


def to_timm(encoder: dict, model_name: str, own: dict, origin: str) -> dict:
    """The tensors of `encoder` under timm's names for `model_name`, whose state dict is `own`.
    Every timm tensor must come from the file, with its shape; the classifier (`_fc`) is dropped;
    anything else left over is an error naming the first few keys."""
    # flat block number -> timm's (stage, index), in timm's own order
    blocks = list(dict.fromkeys(m.group(1) for k in own
                                if (m := re.match(r"^(blocks\.\d+\.\d+)\.", k))))
    expanded = {int(m.group(1)) for k in encoder
                if (m := _BLOCK.match(k)) and m.group(2).startswith("_expand_conv.")}
    mapped, unexpected = {}, []
    for key, v in encoder.items():
        if key.startswith(DROPPED):
            continue
        m = _BLOCK.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            module, _, leaf = rest.partition(".")
            names = EXPANDED if i in expanded else DEPTHWISE
            new = (f"{blocks[i]}.{names[module]}.{leaf}"
                   if i < len(blocks) and module in names else None)
        else:
            module, _, leaf = key.partition(".")
            new = f"{TOP[module]}.{leaf}" if module in TOP else None
        if new is None or new not in own:
            unexpected.append(key)
        else:
            mapped[new] = v
    # BatchNorm's step counter: not every saved state dict keeps it, and it is never used in eval
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in mapped and mapped[k].shape != own[k].shape]
    problems = [f"{len(ks)} {what} ({_names(ks, 3)})" for ks, what in
                ((missing, f"of timm's {model_name} tensors missing"),
                 (unexpected, "tensors of the file without a place in it"),
                 (wrong, "of another shape")) if ks]
    if problems:
        raise RsnaError(f"{origin}: does not map onto timm's {model_name}: "
                        f"{'; '.join(problems)}; {FIX}")
    return {**{k: own[k] for k in own if k not in mapped}, **mapped}


def _config_value(cfg, *path):
    for key in path:
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def _norm(cfg) -> tuple[float, float, str]:
    """(mean, std, where they come from): the checkpoint's config (base.mean, base.std) when it
    has numbers there, else Mammo-CLIP's published ones."""
    mean, std = _config_value(cfg, "base", "mean"), _config_value(cfg, "base", "std")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std))
    if ok and std > 0:
        return float(mean), float(std), "the checkpoint's config"
    return (MAMMO_CLIP_MEAN, MAMMO_CLIP_STD,
            "Mammo-CLIP's published values (no config in the file gives them)")


def import_mammo_clip(path, out, model: str | None = None) -> dict:
    """Write the image encoder of a Mammo-CLIP checkpoint (or an efficientnet-pytorch state dict)
    as timm's tf_efficientnet_bN to `out` (model.safetensors + config.json), for
    `--model tf_efficientnet_bN --pretrained-path out`. `model`, when given, is the timm name the
    file must hold. Returns write_hf_folder's dict plus model_name, norm (mean, std), norm_from,
    prefix, left_out (tensors of other parts: text encoder, projections) and source."""
    import timm
    path = Path(path)
    origin = str(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise RsnaError(f"{origin}: checkpoint {what}; {FIX}")
    obj = read_checkpoint(path)                      # torch.load(weights_only=True)
    encoder, prefix, left_out = find_image_encoder(obj, origin)
    n = detect_variant(encoder, origin)
    name = f"tf_efficientnet_b{n}"
    if model and model != name:
        raise RsnaError(f"{origin}: holds EfficientNet-B{n} ({name}), not the expected {model}; "
                        f"drop --model, or pass a checkpoint of {model}")
    in_chans = int(encoder[STEM].shape[1])
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    net.load_state_dict(to_timm(encoder, name, net.state_dict(), origin), strict=True)
    cfg = obj.get("config") if isinstance(obj, dict) else None
    mean, std, norm_from = _norm(cfg)
    pre = dict(net.pretrained_cfg or {})
    pre.update(tag="mammo_clip", license=None, mean=(mean,) * in_chans, std=(std,) * in_chans)
    h, w = _config_value(cfg, "base", "image_size_h"), _config_value(cfg, "base", "image_size_w")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        pre["input_size"] = (in_chans, h, w)
    net.pretrained_cfg = pre
    said = _config_value(cfg, "model", "image_encoder", "name")
    what = (f"Mammo-CLIP image encoder {said!r} = EfficientNet-B{n}" if isinstance(said, str)
            else f"EfficientNet-B{n}")
    source = f"mammo-clip:{path.name} ({what}, keys {prefix or '(no prefix)'}*)"
    info = write_hf_folder(net, name, out, f"{source}, converted by rsna_utils.learn.mammo_clip")
    return {**info, "model_name": name, "norm": (mean, std), "norm_from": norm_from,
            "prefix": prefix, "left_out": left_out, "source": source}
