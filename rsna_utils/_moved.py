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
    "preprocess": "image.preprocess", "gpu": "image.gpu", "explain": "image.walkthrough",
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
_GPU = ("GPU_BACKENDS", "GPU_SYNTAXES", "INSTALL_HINT", "PROBE_SHAPE", "DecodeRules",
        "compare_decodes", "cpu_decode_frame", "cuda_available", "decode_batch", "encode_probe",
        "looks_scaled", "make_decoder", "package_available", "probe_image",
        "rescale_to_precision", "resolve_backend")
# names that left their old module in 0.2: old module -> {name: "new.module:attribute"}
RENAMED = {
    "gpu": {**{n: f"dicom.decoders.gpu_batch:{n}" for n in _GPU},
            "DaliDecoder": "dicom.decoders.plugins.dali:DaliDecoder",
            "NvImageCodecDecoder": "dicom.decoders.plugins.nvimgcodec:NvImageCodecDecoder"},
    "kaggle": {"load_ensemble": "infer.ensemble:Ensemble.read"},
    "oof": {"submission_tta": "infer.ensemble:submission_tta",
            "ensemble_tta": "_moved:ensemble_tta", "_finite": "infer.ensemble:finite",
            **{n: f"learn.checkpoint:{n}" for n in ("checkpoint_recipe", "recipe_key",
                                                    "CONFIG_FILE", "PER_RUN_FIELDS")}},
    "models": {**{n: f"learn.weights:{n}" for n in ("load_weights", "pickled_globals",
                                                  "SAFE_GLOBAL_PREFIXES")},
               "save_checkpoint": "learn.checkpoint:save_checkpoint",
               **{n: f"learn.backbones:{n}" for n in ("SUPPORTED", "head_modules")}},
    "train": {**{n: f"learn.checkpoint:{n}" for n in ("INPUT_RESIZE", "model_contract")},
              "parse_size": "core.sizes:parse_size"},
    "predict": {"load_checkpoints": "infer.predict:load_models"},
    "dicom_io": {n: f"dicom.header:{n}" for n in ("transfer_syntax_name", "VoiLut")},
    "notebooks": {"KAGGLE_WEIGHTS": "infer.kaggle:KAGGLE_WEIGHTS",
                  "NOTEBOOKS": "_moved:notebooks_folder"},
}
# modules renamed inside their folder in 0.3: image.explain (one image through every
# preprocessing step) shared its name with `rsna explain`, which lives in reports.exam
RENAMED_MODULES = {"image.explain": "image.walkthrough"}
PKG = __name__.rpartition(".")[0]


def ensemble_tta(ens: dict):
    """0.1's `oof.ensemble_tta(dict)`: `Ensemble(ens).tuned_tta`."""
    return _resolve("infer.ensemble:Ensemble")(ens).tuned_tta


def notebooks_folder():
    """0.1's `notebooks.NOTEBOOKS`, found when asked (`app.notebooks.find_notebooks()`)."""
    return _resolve("app.notebooks:find_notebooks")()


def _resolve(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(f"{PKG}.{module}")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if target == "_moved:notebooks_folder" else obj


def new_name(fullname: str) -> str | None:
    """rsna_utils.<old>[.rest] -> rsna_utils.<new>[.rest]; None when it did not move."""
    head, _, rest = fullname.partition(".")
    if head != PKG or not rest:
        return None
    if rest in RENAMED_MODULES:
        return f"{PKG}.{RENAMED_MODULES[rest]}"
    if rest.startswith("dicom.decoders.") and rest.count(".") == 2:   # a plug-in before plugins/
        return _plugin(rest.rpartition(".")[2])
    old, _, tail = rest.partition(".")
    if old not in MOVED:
        return None
    if old == "decoders" and tail:         # the plug-ins: decoders.dali -> dicom.decoders.plugins.dali
        return _plugin(tail) or f"{PKG}.dicom.decoders.{tail}"
    return f"{PKG}.{MOVED[old]}" + (f".{tail}" if tail else "")


def _plugin(name: str) -> str | None:
    """rsna_utils.dicom.decoders.plugins.<name> when that plug-in exists (0.2 kept the plug-ins
    beside the registry, in rsna_utils.dicom.decoders)."""
    import os
    folder = os.path.join(os.path.dirname(__file__), "dicom", "decoders", "plugins")
    return (f"{PKG}.dicom.decoders.plugins.{name}"
            if os.path.isfile(os.path.join(folder, f"{name}.py")) else None)


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
        elif spec.name.partition(".")[2] in RENAMED:
            module = _Renamed(spec.name, module, RENAMED[spec.name.partition(".")[2]])
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


class _Renamed(types.ModuleType):
    """An old module whose names partly moved elsewhere: its new module's names, and the moved
    ones from where they went."""

    def __init__(self, name, module, moved):
        super().__init__(name, module.__doc__)
        self.__spec__, self._module, self._moved = module.__spec__, module, moved

    def __getattr__(self, attr):
        if attr in self._moved:
            return _resolve(self._moved[attr])
        return getattr(self._module, attr)


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())    # before the path finder: one module object
