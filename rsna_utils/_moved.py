"""Old import paths of the flat package (before the subpackages), importable for one release.

`import rsna_utils.preprocess` (or `from rsna_utils.preprocess import Preprocessor`) still
works: it gives the module at its new home and warns once, with a DeprecationWarning naming it.
Planned removal: the release after 0.2.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "errors": "core.errors", "config": "core.config",
    "uids": "dicom.uids", "header": "dicom.header", "frames": "dicom.frames",
    "dicom_io": "dicom.reader", "decoders": "dicom.decoders",
    "voi": "image.voi", "roi": "image.roi", "image_plan": "image.plan",
    "preprocess": "image.preprocess", "gpu": "image.gpu", "explain": "image.explain",
    "data": "learn.data", "models": "learn.models", "weights": "learn.weights",
    "train": "learn.train", "metrics": "learn.metrics",
    "predict": "infer.predict", "oof": "infer.oof", "calibrate": "infer.calibrate",
    "kaggle": "infer.kaggle",
    "evaluate": "reports.evaluate", "heatmap": "reports.heatmap", "exam_report": "reports.exam",
    "plots": "reports.plots", "report": "reports.html", "eda": "reports.eda",
    "synth": "sources.synth", "realdata": "sources.realdata",
    "cli": "app.cli", "cli_steps": "app.steps", "notebooks": "app.notebooks",
    "bundle": "app.bundle",
}
PKG = __name__.rpartition(".")[0]


def new_name(fullname: str) -> str | None:
    """rsna_utils.<old>[.rest] -> rsna_utils.<new>[.rest]; None when it did not move."""
    head, _, rest = fullname.partition(".")
    if head != PKG or not rest:
        return None
    old, _, tail = rest.partition(".")
    if old not in MOVED:
        return None
    if old == "decoders" and tail:         # the plug-ins: decoders.dali -> dicom.decoders.dali
        return f"{PKG}.dicom.decoders.{tail}"
    return f"{PKG}.{MOVED[old]}" + (f".{tail}" if tail else "")


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and hands out the module at its new name (one object, so
    isinstance checks and monkeypatches see the same thing)."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        return importlib.util.spec_from_loader(fullname, self) if new else None

    def create_module(self, spec):
        new = new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path goes "
                      "in the next release)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        if new == f"{PKG}.dicom.decoders":
            # the old `decoders` was the registry and the plug-ins' package at once
            module = _Decoders(spec.name, module, importlib.import_module(f"{new}.registry"))
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec      # the import system set the old name's spec: undo it


class _Decoders(types.ModuleType):
    """The old `rsna_utils.decoders`: the registry's functions, the plug-ins below it."""

    def __init__(self, name, package, registry):
        super().__init__(name, registry.__doc__)
        self.__path__, self.__spec__, self._registry = package.__path__, package.__spec__, registry

    def __getattr__(self, attr):
        return getattr(self._registry, attr)


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())    # before the path finder: one module object
