"""The package's folders are its layers and imports point one way: a module may import its own
subpackage and the subpackages ranked below it, never a higher or a sibling one, and no two
modules import each other, directly or round a circle (function-level imports count too)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rsna_utils"

# The pipeline, bottom up. Subpackages of one rank are siblings and may not import each other.
RANK = {
    "core": 0,       # errors, settings, sizes
    "dicom": 1,      # header, frames, transfer syntaxes, decoder plug-ins
    "image": 2,      # VOI LUT, ROI, the per-image plan and kernels, the folder runner, GPU
    "learn": 3,      # datasets and samplers, models and weights, checkpoints, training, metrics
    "infer": 4,      # prediction, ensembles, thresholds, calibration, Kaggle export
    "reports": 5,    # evaluation, heatmaps, exam reports, plots, the HTML report, EDA
    "sources": 5,    # the synthetic generator, the real-image wrapper
    "app": 6,        # CLI, notebook plans, the Kaggle bundle
}
TOP = {"__init__": 0, "_moved": 0, "__main__": 7}    # modules directly in rsna_utils/
FILES = sorted(PKG.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def layer(mod: str) -> str:
    """The subpackage of a module; "(root)" for the modules directly in rsna_utils/."""
    top = mod.split(".")[0]
    return top if top in RANK else "(root)" if top in TOP else top


def rank(mod: str) -> int:
    top = mod.split(".")[0]
    return RANK[top] if top in RANK else TOP[top]


def _target(name: str) -> str:
    """The module (dotted, below rsna_utils) that an imported name lives in."""
    parts = name.split(".")
    while parts:
        p = PKG.joinpath(*parts)
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return "__init__"        # a name defined in rsna_utils/__init__.py (e.g. __version__)


def imports(path: Path) -> set[str]:
    """The rsna_utils modules (dotted, below the package) that `path` imports, anywhere in it."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "rsna_utils":
            base = n.module.partition(".")[2]
            for a in n.names:       # `from pkg import module` names a module, else a name in pkg
                out.add(_target(f"{base}.{a.name}" if base else a.name))
        elif isinstance(n, ast.Import):
            out |= {_target(a.name.partition(".")[2]) for a in n.names
                    if a.name.startswith("rsna_utils.")}
    return out


GRAPH = {dotted(p): imports(p) - {dotted(p)} for p in FILES}


def test_every_module_is_in_a_ranked_folder():
    unknown = sorted(m for m in GRAPH if m.split(".")[0] not in RANK and m not in TOP)
    assert not unknown, f"rank these in tests/test_layers.py (RANK or TOP): {unknown}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_a_higher_or_sibling_layer(path):
    me = dotted(path)
    bad = sorted(m for m in GRAPH[me]
                 if (layer(m) != layer(me) or layer(me) == "(root)") and rank(m) > rank(me)
                 or layer(m) != layer(me) and rank(m) == rank(me))
    assert not bad, (f"{path.relative_to(PKG)} ({layer(me)}, rank {rank(me)}) imports "
                     + ", ".join(f"{m} ({layer(m)}, rank {rank(m)})" for m in bad))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once (Tarjan's strongly connected components)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(GRAPH) == [], "modules that import each other (break the circle)"


def test_subpackage_inits_import_nothing_of_the_package():
    """A folder's __init__ is its docstring: importing one module never drags in its siblings."""
    busy = sorted(dotted(p) for p in FILES if p.name == "__init__.py" and p.parent != PKG
                  and GRAPH[dotted(p)])
    assert not busy, busy


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from rsna_utils.learn.train import train\n"
                 "    from rsna_utils import infer\n")
    assert imports(f) == {"learn.train", "infer"}
    assert rank("learn.train") > rank("image.voi") and rank("reports.x") == rank("sources.y")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_inference_never_imports_the_training_loop():
    """Inference, reports and the Kaggle export read a model through `learn.checkpoint`."""
    bad = sorted(m for m, deps in GRAPH.items()
                 if layer(m) in ("infer", "reports") and "learn.train" in deps)
    assert not bad, f"import from learn.checkpoint / learn.device instead: {bad}"


@pytest.mark.parametrize("old, name, new", [
    ("rsna_utils.preprocess", "Preprocessor", "rsna_utils.image.preprocess"),
    ("rsna_utils.train", "TrainConfig", "rsna_utils.learn.train"),
    ("rsna_utils.predict", "predict", "rsna_utils.infer.predict"),
    ("rsna_utils.exam_report", "write_exam_reports", "rsna_utils.reports.exam"),
    ("rsna_utils.dicom_io", "read_dicom", "rsna_utils.dicom.reader"),
    ("rsna_utils.decoders", "candidates", "rsna_utils.dicom.decoders.registry"),
    ("rsna_utils.decoders.pydicom", "decode", "rsna_utils.dicom.decoders.pydicom"),
    # names that left their module: found where they went
    ("rsna_utils.gpu", "resolve_backend", "rsna_utils.dicom.decoders.gpu_batch"),
    ("rsna_utils.models", "load_weights", "rsna_utils.learn.weights"),
    ("rsna_utils.train", "INPUT_RESIZE", "rsna_utils.learn.checkpoint"),
    ("rsna_utils.oof", "submission_tta", "rsna_utils.infer.ensemble"),
    ("rsna_utils.predict", "load_checkpoints", "rsna_utils.infer.predict"),
])
def test_old_import_paths_work_for_one_release_and_say_where_the_name_moved(old, name, new):
    import importlib
    import sys
    import warnings
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = getattr(importlib.import_module(old), name)
    want = getattr(importlib.import_module(new), name if name != "load_checkpoints" else
                   "load_models")
    assert got is want
    moved = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]
    assert any(m.split(" moved to ")[0] in (old, old.rpartition(".")[0]) for m in moved), moved


def test_a_name_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        __import__("rsna_utils.no_such_module")
