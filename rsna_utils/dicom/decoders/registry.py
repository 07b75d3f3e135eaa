"""The decoder registry: the plug-ins of `rsna_utils.dicom.decoders.plugins`, found there (every
module of that folder is one; no list of names to edit), and the `DecoderSet` of a run.

A plug-in declares NAME, SYNTAXES (the transfer syntaxes it takes), PACKAGES (what to install
for it), DEVICE ("cpu" or "gpu"), ORDER (`auto` tries lower first), `why_unavailable()` (None,
or why not, in words), `is_available()` and `decode(path, header) -> stored values`; a GPU
plug-in also has `BatchDecoder` (many frames at once, `gpu_batch`).

`DecoderSet.find()` probes every plug-in once and keeps the available ones in order and the
others with their reasons: a run finds one and hands it to its workers (it pickles: names and
reasons, no modules). The set tries, in order, the available decoders that take the file's
syntax; when nothing decodes a file the error lists what was tried, what is installed and what
would decode it. The module-level `candidates` and `decode` use a set found once per process
(`default_set`; `forget()` finds it again).
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom import uids

PLUGINS = "rsna_utils.dicom.decoders.plugins"
DEVICES = ("cpu", "cuda")
NO_CUDA = "no CUDA device"
INTERFACE = ("NAME", "DEVICE", "SYNTAXES", "PACKAGES", "ORDER", "why_unavailable", "decode")

# What decodes a syntax, including packages this project does not use: named in the error
# when nothing installed could.
WOULD_DECODE = {
    uids.RLE_LOSSLESS: "pylibjpeg-rle or dicomsdl",
    uids.JPEG_BASELINE: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_EXTENDED: "pylibjpeg-libjpeg, python-gdcm or dicomsdl",
    uids.JPEG_LOSSLESS: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_LOSSLESS_SV1: "pylibjpeg-libjpeg or dicomsdl",
    uids.JPEG_LS_LOSSLESS: "pyjpegls, python-gdcm or dicomsdl",
    uids.JPEG_LS_NEAR_LOSSLESS: "pyjpegls, python-gdcm or dicomsdl",
    uids.JPEG2000_LOSSLESS: "pylibjpeg-openjpeg or dicomsdl",
    uids.JPEG2000: "pylibjpeg-openjpeg or dicomsdl",
    uids.HTJ2K_LOSSLESS: "pylibjpeg-openjpeg",
    uids.HTJ2K: "pylibjpeg-openjpeg",
}


def _load(name: str) -> ModuleType:
    mod = importlib.import_module(f"rsna_utils.dicom.decoders.plugins.{name}")
    missing = [a for a in INTERFACE if not hasattr(mod, a)]
    if missing or mod.NAME != name or mod.DEVICE not in ("cpu", "gpu"):
        raise RsnaError(f"decoder plug-in {mod.__file__}: missing {', '.join(missing) or 'nothing'}"
                        f", NAME {getattr(mod, 'NAME', None)!r}, DEVICE {getattr(mod, 'DEVICE', None)!r}; "
                        "declare NAME (the module's name), DEVICE (cpu or gpu), SYNTAXES, PACKAGES, "
                        "ORDER, why_unavailable and decode")
    return mod


@functools.lru_cache(maxsize=None)
def plugin_names() -> tuple[str, ...]:
    """Every plug-in module's name: the CPU ones by ORDER, then the GPU ones by ORDER."""
    found = [_load(m.name) for m in pkgutil.iter_modules(importlib.import_module(PLUGINS).__path__)
             if not m.name.startswith("_")]
    found.sort(key=lambda m: (m.DEVICE != "cpu", m.ORDER, m.NAME))
    return tuple(m.NAME for m in found)


def _names(device: str) -> tuple[str, ...]:
    return tuple(n for n in plugin_names() if get(n).DEVICE == device)


def _choose() -> str:
    return (f"choose one of {', '.join(['auto', *_names('cpu')])} "
            f"(GPU: {', '.join(_names('gpu'))})")


def get(name: str) -> ModuleType:
    """The plug-in module `name`; RsnaError naming the choices for an unknown one."""
    if name not in plugin_names():
        raise RsnaError(f"unknown backend {name!r}; {_choose()}")
    return _load(name)


CPU_ORDER = _names("cpu")        # the `auto` order on the CPU
GPU_NAMES = _names("gpu")
ALL = CPU_ORDER + GPU_NAMES


@dataclass(frozen=True)
class Plugin:
    """What a set keeps of one plug-in: plain values (a set pickles without its modules)."""
    name: str
    device: str
    order: int
    syntaxes: frozenset
    packages: str
    why: str | None = None           # None: available


def _why(mod: ModuleType, device: str) -> str | None:
    """One probe of one plug-in (its `why_unavailable`, once; `is_available` is that is None,
    kept for callers): None when it can decode here, else why not."""
    why = mod.why_unavailable()
    if why is not None:
        return why
    if mod.DEVICE == "gpu" and device == "cuda":
        from rsna_utils.dicom.decoders.gpu_shared import cuda_available
        if not cuda_available():
            return NO_CUDA
    return None


class DecoderSet:
    """The decoders of one run, found once: the available ones in order, the others with why.
    `str(DecoderSet.find())` reads e.g. "decoders: imagecodecs, dicomsdl, pydicom (cpu);
    unavailable: nvimgcodec: No module named 'nvidia'; dali: No module named 'nvidia'"."""

    def __init__(self, plugins, backend: str = "auto", device: str = "cpu"):
        self.plugins, self.backend, self.device = tuple(plugins), backend, device

    @classmethod
    def find(cls, backend: str = "auto", device: str = "cpu") -> "DecoderSet":
        """Probe every plug-in once. device "cuda": a GPU plug-in needs a CUDA device too.
        RsnaError for an unknown backend or one not installed (before any file is read)."""
        if device not in DEVICES:
            raise RsnaError(f"decoder device {device!r} is unknown; choose {' or '.join(DEVICES)}")
        if backend != "auto":
            get(backend)                                 # an unknown name fails here
        found = cls([Plugin(m.NAME, m.DEVICE, m.ORDER, frozenset(m.SYNTAXES), m.PACKAGES,
                            _why(m, device)) for m in map(get, plugin_names())], backend, device)
        if backend != "auto":
            found.require(backend)
        return found

    def __getitem__(self, name: str) -> Plugin:
        for p in self.plugins:
            if p.name == name:
                return p
        raise RsnaError(f"unknown backend {name!r}; {_choose()}")

    def names(self, device: str | None = None) -> list[str]:
        """The available plug-ins in `auto` order ("cpu" or "gpu" ones only when given)."""
        return [p.name for p in self.plugins if p.why is None and device in (None, p.device)]

    @property
    def unavailable(self) -> dict[str, str]:
        return {p.name: p.why for p in self.plugins if p.why is not None}

    def require(self, name: str) -> None:
        """RsnaError when the plug-in `name` is unknown or cannot run here."""
        p = self[name]
        if p.why == NO_CUDA:
            raise RsnaError(f"backend {name!r} decodes on a GPU and there is no CUDA device here; "
                            "use --backend auto or a CPU backend")
        if p.why is not None:
            raise RsnaError(f"backend {name!r} is not installed; pip install {p.packages} "
                            f"({name}: {p.why})")

    def describe(self) -> str:
        """One line for logs: what decodes, per device, and what does not, with why."""
        have = "; ".join(f"{', '.join(n)} ({d})" for d in ("cpu", "gpu") if (n := self.names(d)))
        miss = "; ".join(f"{n}: {why}" for n, why in self.unavailable.items())
        return f"decoders: {have or 'none'}" + (f"; unavailable: {miss}" if miss else "")

    __str__ = describe

    def __repr__(self) -> str:
        return f"DecoderSet(backend={self.backend!r}, device={self.device!r}, {self.describe()})"

    def candidates(self, syntax: str, backend: str | None = None) -> list[str]:
        """The CPU decoders to try for `syntax`, in order (`auto`), or the one asked for.
        Raises RsnaError when the one asked for is unknown or not installed; one that does not
        take the syntax is returned all the same (`decode` then names it as not taking it)."""
        backend = backend or self.backend
        if backend == "auto":
            return [p.name for p in self.plugins
                    if p.device == "cpu" and p.why is None and syntax in p.syntaxes]
        self.require(backend)
        return [backend]

    def decode(self, h, backend: str | None = None, check=None) -> tuple[np.ndarray, str]:
        """The first frame's stored values from the first decoder that succeeds; returns
        (array, decoder name). `check(array) -> array` validates each decoder's output (a wrong
        shape raises DecodeError, and the next decoder is tried). DecodeError naming everything
        tried, installed and missing when none succeeds."""
        backend = backend or self.backend
        order = self.candidates(h.transfer_syntax, backend)
        errors = []
        for name in order:
            mod = get(name)
            if h.transfer_syntax not in mod.SYNTAXES:
                errors.append(f"{name}: does not take {uids.name(h.transfer_syntax)}")
                continue
            try:
                arr = mod.decode(h.path, h)
                return (check(arr) if check else arr), name
            except DecodeError as e:
                errors.append(str(e))
            except MemoryError:
                errors.append(f"{name}: out of memory")
        missing = [f"{p.name}: {p.why}" for p in self.plugins
                   if p.why is not None and p.device == "cpu" and h.transfer_syntax in p.syntaxes]
        hint = (" (if installed, the data is likely corrupt)" if backend == "auto"
                or self[backend].device == "cpu" else "")
        raise DecodeError(
            f"{h.path}: cannot decode {uids.name(h.transfer_syntax)} pixel data; tried "
            f"{', '.join(order) or 'nothing (no installed decoder takes it)'}; installed: "
            f"{', '.join(self.names('cpu')) or 'none'}; it decodes with "
            f"{WOULD_DECODE.get(h.transfer_syntax, 'a decoder for this transfer syntax')}"
            f"{hint}{' (not available here: ' + ', '.join(missing) + ')' if missing else ''}"
            f" [{'; '.join(errors)}]")


_DEFAULTS: dict[str, DecoderSet] = {}


def default_set(device: str = "cpu") -> DecoderSet:
    """The set of this process for `device` (backend `auto`), found on first use."""
    if device not in _DEFAULTS:
        _DEFAULTS[device] = DecoderSet.find("auto", device)
    return _DEFAULTS[device]


def forget() -> None:
    """Find the plug-ins and the default sets again (after installing a package)."""
    _DEFAULTS.clear()
    plugin_names.cache_clear()


def candidates(syntax: str, backend: str = "auto", decoders: DecoderSet | None = None) -> list[str]:
    """`DecoderSet.candidates` of `decoders` (default: this process's set)."""
    return (decoders or default_set()).candidates(syntax, backend)


def decode(h, backend: str = "auto", check=None,
           decoders: DecoderSet | None = None) -> tuple[np.ndarray, str]:
    """`DecoderSet.decode` of `decoders` (default: this process's set)."""
    return (decoders or default_set()).decode(h, backend, check)
