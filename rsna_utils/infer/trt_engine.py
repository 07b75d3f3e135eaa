"""TensorRT for `rsna predict --runtime tensorrt`: onnxruntime's TensorRT execution provider
ahead of its CUDA one (`infer.engine.attach_engines`). TensorRT builds an FP16 engine from each
export on the GPU it runs on; engines are kept in a folder named for that GPU and the TensorRT
and onnxruntime versions (`engine_key`), so one built for another GPU or version is never
loaded: a new one is built. What is probed before a session asks for the provider: a CUDA
device, an onnxruntime with the provider (onnxruntime-gpu), and TensorRT 10's libraries, loaded
here from the tensorrt-cu*-libs wheel (`tensorrt_why_not`). Not run on a GPU yet (issue 42)."""
from __future__ import annotations

import os
from pathlib import Path

from rsna_utils.core.errors import RsnaError

TRT_PROVIDER = "TensorrtExecutionProvider"
# TensorRT for the TensorRT provider: both onnxruntime-gpu pins link libnvinfer.so.10 and
# libnvonnxparser.so.10 (readelf of libonnxruntime_providers_tensorrt.so), so TensorRT 10's
# last release, per CUDA major (TensorRT 11 has other sonames: it would not load). PyPI holds
# a stub of each that fetches the wheel from NVIDIA's index when installed (NVIDIA_INDEX).
TRT_LIBS_PINS = {"13": "tensorrt-cu13-libs==10.16.1.11", "12": "tensorrt-cu12-libs==10.16.1.11"}
NVIDIA_INDEX = "https://pypi.nvidia.com"
TRT_SONAMES = ("libnvinfer.so.10", "libnvonnxparser.so.10")      # what that library NEEDs
TRT_BATCH = 8          # the engines' largest batch (their optimisation profile); larger: split


def tensorrt_install(cuda: str | None = None) -> str:
    """The pip line for TensorRT's libraries the TensorRT provider loads, for torch's CUDA."""
    cuda = torch_cuda() if cuda is None else cuda
    pin = TRT_LIBS_PINS.get(str(cuda).split(".")[0])
    pip = f"pip install --extra-index-url {NVIDIA_INDEX} "
    return (pip + pin if pin else pip + " or ".join(
        f"{p} (CUDA {k})" for k, p in TRT_LIBS_PINS.items())) + " (docs/gpu.md)"


def tensorrt_why_not(device_type: str) -> str | None:
    """Why onnxruntime's TensorRT provider cannot be asked for here, or None: not a GPU, an
    onnxruntime without the provider, or TensorRT 10's libraries not loadable. They are
    loaded here (RTLD_GLOBAL), from the tensorrt-cu*-libs wheel's folder or the system's, so
    that the provider finds them when the session loads it."""
    if device_type != "cuda":
        return f"TensorRT needs a CUDA device (this one is {device_type})"
    try:
        import onnxruntime as ort
    except ImportError as e:
        return (f"onnxruntime is not installed ({e}; onnxruntime-gpu carries the provider: "
                "docs/gpu.md)")
    if TRT_PROVIDER not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no TensorRT execution provider (it has "
                f"{', '.join(ort.get_available_providers())}; onnxruntime-gpu carries it: "
                "docs/gpu.md)")
    import ctypes
    import importlib.util
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for soname in TRT_SONAMES:
        err = None
        for where in [os.path.join(f, soname) for f in folders] + [soname]:
            try:
                ctypes.CDLL(where, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError as e:
                err = e
        else:
            return f"TensorRT's {soname} does not load ({err}); {tensorrt_install()}"
    return None


def tensorrt_version() -> str:
    """The installed TensorRT libraries' version (the tensorrt-cu*-libs wheel), else "system"."""
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("tensorrt-cu13-libs", "tensorrt-cu12-libs", "tensorrt"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "system"


def engine_key(device) -> str:
    """The name of the TensorRT engine cache for this GPU, TensorRT and onnxruntime: an engine
    is valid for one GPU model and one TensorRT version only, so a cache built on another is
    another folder and is never loaded."""
    import re

    import onnxruntime as ort
    import torch
    index = _device(device).index or 0
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    key = f"{name}-sm{major}{minor}-trt{tensorrt_version()}-ort{ort.__version__}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", key)


def tensorrt_cache(base: str | Path, device) -> Path:
    """A writable folder for the TensorRT engines of this GPU (`engine_key`): under
    $RSNA_TRT_CACHE, else beside the exports (base/trt-cache), else ~/.cache/rsna_utils
    (an export in a read-only folder: a Kaggle dataset)."""
    key = engine_key(device)
    roots = [os.environ.get("RSNA_TRT_CACHE"), Path(base) / "trt-cache",
             Path.home() / ".cache" / "rsna_utils" / "trt-cache"]
    tried = []
    for root in roots:
        if not root:
            continue
        folder = Path(root) / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".writable"
            probe.write_text("")
            probe.unlink()
            return folder
        except OSError as e:
            tried.append(f"{folder} ({e.strerror or e})")
    raise RsnaError("no writable folder for TensorRT's engines: " + "; ".join(tried) +
                    "; set RSNA_TRT_CACHE to one")


def tensorrt_provider(contract: dict, spec, device, cache: Path) -> tuple[str, dict]:
    """The TensorRT provider with its options for one export: FP16, engines and timing cache
    in `cache`, and one optimisation profile for the contract's input from 1 to TRT_BATCH
    images (`OnnxModel` splits larger batches), so the engine is built once, not per shape."""
    name = contract.get("input", "input")
    h, w = spec.size
    shape = lambda n: f"{name}:{n}x{spec.channels}x{h}x{w}"      # noqa: E731
    return TRT_PROVIDER, {
        "device_id": _device(device).index or 0, "trt_fp16_enable": True,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(TRT_BATCH),
        "trt_profile_max_shapes": shape(TRT_BATCH)}


def torch_cuda() -> str:
    """The CUDA major.minor torch was built for ("" for none)."""
    try:
        import torch
        return torch.version.cuda or ""
    except ImportError:
        return ""


def _device(device):
    import torch
    return device if isinstance(device, torch.device) else torch.device(device)
