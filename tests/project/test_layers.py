"""The package's folders are its layers and imports point one way: a module may import its own
subpackage and the subpackages ranked below it, never a higher or a sibling one, and no two
modules import each other, directly or round a circle. Every way of importing counts:
function-level imports, relative imports (`from . import x`, `from ..core import errors`) and
modules loaded by name through `importlib.import_module`: a constant name, or an f-string whose
constant head names a package (`f"rsna_utils.dicom.decoders.{name}"`), which counts as importing
each module of that package named by a string constant in the same file (the registry's lists
of plug-in names), or every module of the package when the file names none."""
import ast
from pathlib import Path

import pytest
from conftest import REPO, TESTS

PKG = REPO / "rsna_utils"

# The pipeline, bottom up. Subpackages of one rank are siblings and may not import each other.
RANK = {
    "core": 0,       # errors, settings, sizes, the RSNA table (columns, ids, paths, sites, split)
    "dicom": 1,      # header, frames, transfer syntaxes, decoder plug-ins
    "image": 2,      # VOI LUT, ROI, the per-image plan and kernels, the folder runner, GPU
    "sources": 3,    # what makes RSNA-shaped data: the synthetic generator, ingest, real images
    "learn": 4,      # datasets and samplers, models and weights, checkpoints, training, metrics
    "infer": 5,      # prediction, ensembles, thresholds, calibration, Kaggle export
    "reports": 6,    # evaluation, heatmaps, exam reports, plots, the HTML report, EDA
    "app": 7,        # CLI, notebook plans, the Kaggle bundle
}
TOP = {"__init__": 0, "_moved": 0, "__main__": 8}    # modules directly in rsna_utils/
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


def _package(path: Path) -> list[str]:
    """The package (parts below rsna_utils) that a relative import in `path` starts from."""
    if not path.resolve().is_relative_to(PKG):
        return []            # a file outside the package (the checks' own examples)
    parts = list(path.resolve().relative_to(PKG).with_suffix("").parts)
    return parts[:-1]        # a module's folder; for an __init__, the folder it is the init of


def _absolute(package: list[str], n: ast.ImportFrom) -> str | None:
    """The absolute dotted module of a `from ... import` in a module of `package`, below
    rsna_utils ("" for the package itself); None when it is not the package's."""
    if n.level == 0:
        if not n.module or n.module.split(".")[0] != "rsna_utils":
            return None
        return n.module.partition(".")[2]
    base = package
    if n.level - 1 > len(base):
        return None                                  # above rsna_utils/
    base = base[:len(base) - (n.level - 1)]
    return ".".join(base + (n.module.split(".") if n.module else []))


def _modules_in(package: str) -> set[str]:
    """The modules directly in a package of rsna_utils (dotted below it)."""
    folder = PKG.joinpath(*package.split(".")) if package else PKG
    return {f"{package}.{p.stem}" if package else p.stem for p in folder.glob("*.py")
            if p.stem != "__init__"} | {f"{package}.{d.name}" if package else d.name
                                        for d in folder.iterdir()
                                        if (d / "__init__.py").exists()}


def _loaded_by_name(n: ast.Call, names: set[str]) -> set[str]:
    """What `importlib.import_module(...)` / `import_module(...)` loads, when its name is a
    constant or an f-string with a constant head inside rsna_utils; else nothing. `names`: the
    string constants of the file (the names an f-string's `{name}` may take)."""
    f = n.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name != "import_module" or not n.args:
        return set()
    arg = n.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        if arg.value.startswith("rsna_utils."):
            return {_target(arg.value.partition(".")[2])}
        return set()
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        head = str(arg.values[0].value)
        if head.startswith("rsna_utils.") and head.endswith("."):
            package = _target(head[len("rsna_utils."):-1])
            if package == "__init__" and head != "rsna_utils.":
                return set()
            found = _modules_in("" if package == "__init__" else package)
            named = {m for m in found if m.rpartition(".")[2] in names}
            return named or found
        if head.startswith("rsna_utils."):
            return {_target(head.partition(".")[2].rstrip("."))}
    return set()


def imports(path: Path) -> set[str]:
    """The rsna_utils modules (dotted, below the package) that `path` imports, anywhere in it:
    absolute and relative imports, and modules loaded by name through importlib."""
    return imports_in(path.read_text(), _package(path))


def imports_in(code: str, package: list[str]) -> set[str]:
    """`imports` of the source `code` of a module in `package` (parts below rsna_utils)."""
    out, tree = set(), ast.parse(code)
    names = {n.value for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier()}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = _absolute(package, n)
            if base is None:
                continue
            for a in n.names:       # `from pkg import module` names a module, else a name in pkg
                out.add(_target(f"{base}.{a.name}" if base else a.name))
        elif isinstance(n, ast.Import):
            out |= {_target(a.name.partition(".")[2]) for a in n.names
                    if a.name.startswith("rsna_utils.")}
        elif isinstance(n, ast.Call):
            out |= _loaded_by_name(n, names)
    return out


GRAPH = {dotted(p): imports(p) - {dotted(p)} for p in FILES}


def test_every_module_is_in_a_ranked_folder():
    unknown = sorted(m for m in GRAPH if m.split(".")[0] not in RANK and m not in TOP)
    assert not unknown, f"rank these in tests/project/test_layers.py (RANK or TOP): {unknown}"


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


# tests/ mirrors these folders: tests/<layer>/test_<area>.py for the layer folder whose code a
# test file mainly tests, tests/project/ for the checks of the project as a whole (these
# layers, the docs, kill and resume, a full disk, fuzzing, nothing overwritten unasked)
PROJECT = "project"


def misplaced_tests(tests: Path) -> list[str]:
    """The test files outside that mirror, and any file name used twice (pytest imports test
    files by their name: no __init__.py in tests/, the default prepend import mode)."""
    out, seen = [], {}
    for f in sorted(tests.rglob("test_*.py")):
        rel = f.relative_to(tests)
        if len(rel.parts) != 2 or rel.parts[0] not in (*RANK, PROJECT):
            out.append(f"tests/{rel.as_posix()}: not in tests/<layer>/ for a folder of rsna_utils/ "
                       f"({', '.join(RANK)}) nor in tests/{PROJECT}/")
        if f.name in seen:
            out.append(f"tests/{rel.as_posix()}: the name of tests/{seen[f.name]} too")
        seen.setdefault(f.name, rel.as_posix())
    return out


def test_the_tests_mirror_the_package_folders():
    folders = {d.name for d in PKG.iterdir() if (d / "__init__.py").exists()}
    assert folders == set(RANK), f"rank these here (RANK): {folders ^ set(RANK)}"
    assert not misplaced_tests(TESTS), "\n".join(misplaced_tests(TESTS))
    assert {f.parent.name for f in TESTS.rglob("test_*.py")} == {*RANK, PROJECT}   # each has tests


def test_no_test_file_imports_another():
    """A test file that imports another (`from test_gpu import ...`) runs only when pytest has
    already put the other's folder on sys.path: `pytest tests/infer` alone failed so. Shared
    helpers live in tests/ (conftest.py, fakes.py, fuzz.py)."""
    bad = []
    for f in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{f.relative_to(TESTS)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0].startswith("test_")]
    assert not bad, "move what they share into tests/fakes.py: " + "; ".join(bad)


def test_the_mirror_check_refuses_a_flat_layout_a_stray_folder_and_a_repeated_name(tmp_path):
    for rel in ("learn/test_train.py", "project/test_docs.py", "test_voi.py", "misc/test_x.py",
                "image/old/test_y.py", "image/test_train.py", "learn/helper.py", "conftest.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    outside = "not in tests/<layer>/ for a folder of rsna_utils/"
    assert [m.split(": ")[0] for m in misplaced_tests(tmp_path) if outside in m] == [
        "tests/image/old/test_y.py", "tests/misc/test_x.py", "tests/test_voi.py"]
    assert [m for m in misplaced_tests(tmp_path) if outside not in m] == [
        "tests/learn/test_train.py: the name of tests/image/test_train.py too"]
    # the flat layout this mirror replaced: every test file is named
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("test_voi.py", "test_train.py", "test_docs.py"):
        (flat / name).write_text("")
    assert len(misplaced_tests(flat)) == 3


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from rsna_utils.learn.train import train\n"
                 "    from rsna_utils import infer\n")
    assert imports(f) == {"learn.train", "infer"}
    assert rank("learn.train") > rank("image.voi") and rank("learn.x") > rank("sources.y")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_relative_imports_and_modules_loaded_by_name_count():
    """The graph sees `from . import x`, `from ..x import y` and importlib's string targets: a
    registry that loads its plug-ins by name imports each of them, so a plug-in that imports the
    registry back closes a circle."""
    code = ("from . import registry\nfrom .gpu_batch import resolve_backend\n"
            "from ..header import read_header\nfrom ...core import errors\n"
            "import importlib\n"
            "def f(name):\n"
            "    importlib.import_module('rsna_utils.learn.train')\n"
            "    return importlib.import_module(f'rsna_utils.dicom.decoders.plugins.{name}')\n")
    # as if the code were a module of rsna_utils/dicom/decoders/
    got = imports_in(code, ["dicom", "decoders"])
    named = imports_in(code + "NAMES = ('dali', 'pydicom')\n", ["dicom", "decoders"])
    every = {f"dicom.decoders.plugins.{p.stem}" for p in
             (PKG / "dicom" / "decoders" / "plugins").glob("*.py") if p.stem != "__init__"}
    assert {"dicom.decoders.registry", "dicom.decoders.gpu_batch", "dicom.header", "core.errors",
            "learn.train"} <= got
    assert every <= got          # no names in the file: any module of the package may be loaded
    assert {"dicom.decoders.plugins.dali", "dicom.decoders.plugins.pydicom"} <= named
    assert "dicom.decoders.plugins.dicomsdl" not in named   # names in the file: those only
    loop = {"registry": {"plugin"}, "plugin": {"gpu"}, "gpu": {"registry"}}
    assert cycles(loop) == [["gpu", "plugin", "registry"]]


def test_the_decoder_registry_counts_as_importing_every_plugin():
    """`registry.get(name)` loads `rsna_utils.dicom.decoders.plugins.{name}`: the graph has those
    edges (without them the registry -> plug-in -> gpu_batch -> registry circle went unseen), and
    as the registry names no plug-in, every module of plugins/ counts (`plugin_names` finds them)."""
    every = {f"dicom.decoders.plugins.{p.stem}" for p in (PKG / "dicom" / "decoders" / "plugins")
             .glob("*.py") if p.stem != "__init__"}
    assert {"dicom.decoders.plugins.dali", "dicom.decoders.plugins.pydicom"} <= every <= \
        GRAPH["dicom.decoders.registry"]


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
    ("rsna_utils.decoders.pydicom", "decode", "rsna_utils.dicom.decoders.plugins.pydicom"),
    ("rsna_utils.dicom.decoders.dali", "DaliDecoder", "rsna_utils.dicom.decoders.plugins.dali"),
    ("rsna_utils.image.explain", "explain_image", "rsna_utils.image.walkthrough"),
    ("rsna_utils.explain", "pick_example", "rsna_utils.image.walkthrough"),
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
