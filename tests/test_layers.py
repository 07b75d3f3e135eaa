"""The package is layered and its imports point one way: a module may import its own layer
and the layers below, never a higher one (function-level imports count too)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rsna_utils"

LAYERS = [
    # 0: errors and constants, the config machinery (settings as dataclass fields)
    {"errors", "uids", "config", "__init__"},
    # 1: header and frames
    {"header", "frames"},
    # 2: decoders, windowing, ROI (dicom_io: header + decoders behind read_dicom)
    {"decoders", "dicom_io", "voi", "roi"},
    # 3: the image pipeline
    {"image_plan", "preprocess", "gpu", "explain"},
    # 4: the folder runner, data, models, training, inference and what they build on
    {"data", "models", "weights", "train", "predict", "oof", "calibrate", "metrics", "heatmap",
     "kaggle", "synth", "realdata"},
    # 5: CLI, notebooks, plots, reports
    {"cli", "cli_steps", "__main__", "notebooks", "plots", "report", "eda", "evaluate",
     "exam_report", "bundle"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem     # decoders/x.py -> decoders


def _imports(path: Path) -> set[str]:
    """rsna_utils modules (first component below the package) that `path` imports."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "rsna_utils":
            parts = n.module.split(".")
            out |= {a.name for a in n.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names
                    if a.name.startswith("rsna_utils.")}
    return out


FILES = sorted(PKG.rglob("*.py"))


def test_every_module_has_one_layer():
    assert sum(len(layer) for layer in LAYERS) == len(LAYER), "a module is in two layers"
    missing = sorted({_module(p) for p in FILES} - set(LAYER))
    assert not missing, f"place these modules in a layer of tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_a_higher_layer(path):
    me = _module(path)
    up = sorted(m for m in _imports(path) - {me} if LAYER.get(m, -1) > LAYER[me])
    assert not up, (f"{path.relative_to(PKG)} (layer {LAYER[me]}) imports higher layers: "
                    + ", ".join(f"{m} ({LAYER[m]})" for m in up))


def test_the_check_catches_an_upward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from rsna_utils.train import train\n")
    assert _imports(f) == {"train"} and LAYER["train"] > LAYER["voi"]
