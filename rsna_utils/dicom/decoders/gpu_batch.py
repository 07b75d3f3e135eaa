"""GPU decoders chosen by name (nvImageCodec, DALI): which plug-in `auto` picks (`resolve_backend`:
the first that builds and passes its self-test), a plug-in's batch decoder by name, and the batch
decode of the first frames of many files into stored values.

The machinery that names no plug-in (the self-test, the shared decoder, the frame decode) lives
in `gpu_shared`, which the plug-ins import; it is re-exported here. This module finds plug-ins
through `registry.get`, and the registry loads them by name, so no plug-in imports this module.

Nothing here imports CUDA packages at module import.
"""
from __future__ import annotations

from rsna_utils.core.errors import RsnaError, say_once
from rsna_utils.dicom import uids
from rsna_utils.dicom.decoders import registry
from rsna_utils.dicom.decoders import gpu_shared
from rsna_utils.dicom.decoders.gpu_shared import (  # noqa: F401 - re-exported: the GPU API's home
    GPU_SYNTAXES, PROBE_SHAPE, DecodeRules, compare_decodes, cpu_decode_frame, cuda_available,
    encode_probe, imports, looks_scaled, probe_image, rescale_to_precision)

GPU_BACKENDS = registry.GPU_NAMES
INSTALL_HINT = "pip install -r requirements-gpu.txt (nvidia-nvimgcodec-cu13, nvidia-dali-cuda130)"


def package_available(name: str) -> bool:
    """Whether the GPU plug-in `name` finds its package (it checks it itself)."""
    return name in GPU_BACKENDS and registry.get(name).is_available()


def resolve_backend(name: str, device: str | None = None, decoders=None) -> str:
    """`auto` -> the first GPU plug-in that builds on `device` (default: "cuda" when CUDA is
    present, else the CPU path at once) and decodes its probe as the CPU does (`unusable`); else
    "cpu", with the reasons printed once. A CUDA 13 wheel imports on a CUDA 12 host and fails only
    when it runs: importing is not enough. A GPU plug-in named explicitly must be installed.
    `decoders` (a `registry.DecoderSet`): the GPU plug-ins are its available ones, in its order
    (no probe of the packages again), and its device is the default device."""
    gpu = GPU_BACKENDS if decoders is None else decoders.names("gpu")
    if name == "auto":
        if device is None and decoders is not None:    # no CUDA: every GPU plug-in says so
            device = "cuda" if decoders.device == "cuda" and any(
                decoders[b].why != registry.NO_CUDA for b in GPU_BACKENDS) else None
        elif device is None:
            device = "cuda" if cuda_available() else None
        if device is None:
            return "cpu"
        reasons = [f"{b}: {why}" for b, why in (decoders.unavailable if decoders else {}).items()
                   if b in GPU_BACKENDS]
        for b in gpu:
            why = unusable(b, device, decoders)
            if why is None:
                return b
            reasons.append(f"{b} {why}")
        say_once(f"decoding on the CPU: {'; '.join(reasons)}")
        return "cpu"
    if name in GPU_BACKENDS:
        if decoders is not None:
            decoders.require(name)
        elif not package_available(name):
            raise RsnaError(f"backend {name!r} is not installed; {INSTALL_HINT}")
        return name
    return "cpu"


_UNUSABLE: dict[tuple[str, str], str | None] = {}


def unusable(name: str, device: str, decoders=None) -> str | None:
    """None when the GPU plug-in `name` is installed, builds its batch decoder on `device` and
    decodes a 12-bit JPEG 2000 probe bit-exact (or on the 16-bit grid, which it rescales); else
    why not, in words. Checked once per process (the decoder built is the shared one).
    `decoders`: the `registry.DecoderSet` that says whether it is installed."""
    key = (name, device)
    if key not in _UNUSABLE:
        installed = name in decoders.names("gpu") if decoders is not None else package_available(name)
        if not installed:
            why = "is not installed"
        else:
            try:
                mode = shared_decoder(name, device).rules.mode(uids.JPEG2000_LOSSLESS, "j2k", 12)
                why = None if mode in ("exact", "scaled", "unverified") else f"failed its probe ({mode})"
            except Exception as e:          # a wheel for another CUDA, no driver, no device...
                why = f"did not build ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        _UNUSABLE[key] = why
    return _UNUSABLE[key]


def make_decoder(name: str, device: str = "cuda", batch_size: int = 32):
    """A batched GPU decoder (the plug-in's `BatchDecoder`) with its `rules` (the self-tested
    routing of `DecodeRules`). Builds and self-tests a new one: a run keeps the one it made."""
    if name not in GPU_BACKENDS:
        raise RsnaError(f"unknown GPU backend {name!r}; choose {', '.join(GPU_BACKENDS)}")
    return gpu_shared.build_decoder(name, registry.get(name).BatchDecoder, device, batch_size)


def shared_decoder(name: str, device: str):
    """The one decoder of this process for (name, device), built on first use: single files
    (`read_dicom(path, "dali")`) reuse it and its self-test results instead of rebuilding both."""
    return gpu_shared.shared_decoder(name, device, registry.get(name).BatchDecoder)


shared_decoder.cache_clear = gpu_shared.shared_decoder.cache_clear


def decode_batch(headers, backend: str, device: str = "cuda", decoder=None) -> list:
    """Stored values (numpy) for each header's file (first frame); DecodeError for a file the
    GPU decoder does not take or fails on (use the CPU path for it)."""
    return gpu_shared.decode_frames(headers, backend, decoder or shared_decoder(backend, device))
