"""The notebook suite: thin (a test parses every cell), stored without outputs, and runnable
headless through the demo plan; the plans name real parameters; the submit plan needs no training."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from rsna_utils.app.notebooks import find_notebooks, load_plan, run_plan

NOTEBOOKS = find_notebooks()

NBS = sorted(NOTEBOOKS.glob("*.ipynb"))
FIRST = ["01_eda.ipynb", "02_preprocessing_demo.ipynb", "03_train.ipynb",
         "04_inference_submission.ipynb"]
FORBIDDEN = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.Lambda,
             ast.AsyncFor)
MAX_LINE = 100
PLANS = ["demo", "kaggle", "submit"]


def test_the_four_notebooks_exist_in_order():
    names = [p.name for p in NBS]
    assert names[:4] == FIRST
    # later notebooks (05_explain_evaluate...) come after, numbered on
    assert all(n[:2].isdigit() and int(n[:2]) > 4 for n in names[4:]), names


def _code(path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _imported_names(tree) -> list[str]:
    names = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names += [a.asname or a.name.split(".")[0] for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            names += [a.asname or a.name for a in n.names]
    return names


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_notebooks_are_thin_and_stored_without_outputs(path):
    code = _code(path)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    for stmt in ast.parse(params[0].source).body:
        assert isinstance(stmt, ast.Assign), f"parameters cell: only assignments ({ast.dump(stmt)[:60]})"
        ast.literal_eval(stmt.value)   # literals only: raises otherwise
    imported, used = [], set()
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, "strip outputs"
        tree = ast.parse(c.source)
        bad = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, FORBIDDEN)]
        assert not bad, f"logic belongs in rsna_utils, not a notebook: {bad} in\n{c.source}"
        # the parameters cell is literals only (checked above): one line per setting a plan sets
        assert len(c.source.splitlines()) <= (32 if c in params else 25)
        long = [ln for ln in c.source.splitlines() if len(ln) > MAX_LINE]
        assert not long, f"code lines over {MAX_LINE} characters in {path.name}: {long}"
        imported += _imported_names(tree)
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    unused = [n for n in imported if n not in used]
    assert not unused, f"{path.name} imports {unused} but never uses them"


def test_the_thinness_checks_can_fail():
    tree = ast.parse("import os, json as j\nfrom pathlib import Path\nos.getcwd()")
    assert [n for n in _imported_names(tree)
            if n not in {x.id for x in ast.walk(tree) if isinstance(x, ast.Name)}] == ["j", "Path"]


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_every_notebook_starts_with_the_bundle_setup_cell(path):
    cells = nbformat.read(path, as_version=4).cells
    first = cells[0]
    assert first.cell_type == "code" and "parameters" not in first.metadata.get("tags", [])
    assert "rsna_bundle.json" in first.source and "install.py" in first.source
    code = _code(path)
    assert code.index(first) < [i for i, c in enumerate(code)
                                if "parameters" in c.metadata.get("tags", [])][0]


def _run_setup(source: str, kaggle_input: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KAGGLE_INPUT=str(kaggle_input))
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_setup_cell_does_nothing_without_a_bundle_and_installs_with_one(tmp_path):
    source = _code(NBS[0])[0].source
    assert all(_code(p)[0].source == source for p in NBS), "one setup cell, the same everywhere"
    inputs = tmp_path / "input"
    (inputs / "rsna-breast-cancer-detection").mkdir(parents=True)     # a competition, no bundle
    r = _run_setup(source, inputs)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r
    assert _run_setup(source, tmp_path / "absent").returncode == 0     # not on Kaggle at all
    bundle = inputs / "rsna-bundle"
    bundle.mkdir()
    (bundle / "rsna_bundle.json").write_text("{}")
    (bundle / "install.py").write_text(
        "import pathlib, sys\npathlib.Path(sys.argv[0]).with_name('ran').write_text('yes')\n")
    r = _run_setup(source, inputs)
    assert r.returncode == 0, r.stderr
    assert (bundle / "ran").read_text() == "yes"
    (bundle / "install.py").write_text("raise SystemExit(3)\n")       # a failed install stops it
    assert _run_setup(source, inputs).returncode != 0


@pytest.mark.parametrize("plan", PLANS)
def test_plans_name_real_parameters(plan):
    import papermill as pm
    d = load_plan(plan)
    for step in d["steps"]:
        declared = set(pm.inspect_notebook(str(NOTEBOOKS / step["notebook"])))
        assert set(step.get("parameters", {})) <= declared, step


@pytest.mark.parametrize("plan", ["demo", "kaggle"])
def test_training_plans_follow_the_model_progression(plan):
    d = load_plan(plan)
    models = [s["parameters"].get("model") for s in d["steps"] if s["notebook"] == "03_train.ipynb"]
    order = list(dict.fromkeys(models))      # the progression, each model once (folds repeat it)
    assert order[0] == "resnet18" and order[1] == "resnext50_32x4d"
    assert "efficientnet" in order[2]
    infer = [s for s in d["steps"] if s["notebook"] == "04_inference_submission.ipynb"][-1]
    assert infer["parameters"]["export_dir"] == "{run_dir}/rsna-models"


def test_notebook_parameters_are_named_after_what_they_set():
    """03 sets TrainConfig fields, 02 PreprocessConfig fields and Preprocessor.run arguments, 04
    predict's arguments: one spelling per setting (the extra ones are listed here)."""
    import dataclasses
    import inspect

    import papermill as pm

    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.infer.predict import predict
    from rsna_utils.learn.train_config import TrainConfig

    def params(nb):
        return set(pm.inspect_notebook(str(NOTEBOOKS / nb)))

    assert params("03_train.ipynb") <= {f.name for f in dataclasses.fields(TrainConfig)}
    pre = ({f.name for f in dataclasses.fields(PreprocessConfig)}
           | set(inspect.signature(Preprocessor.run).parameters)
           | set(inspect.signature(Preprocessor).parameters))
    assert params("02_preprocessing_demo.ipynb") - pre == {"example"}
    extra = {"ensemble", "oof_runs", "export_dir", "hidden_test_patients"}
    assert params("04_inference_submission.ipynb") - set(inspect.signature(predict).parameters) == extra


# Parameters whose notebook value is the stand-alone run's own, not a setting's default: the
# small synthetic set's files and sizes, and 04's `tta = None` (follow the ensemble's flip).
OWN_VALUES = {"data", "csv", "csv_path", "images", "out", "checkpoints", "sample_submission",
              "labels", "size", "tta"}


def _parameter_values(nb: str) -> dict:
    """{name: value} of a notebook's parameters cell (literals only)."""
    import ast
    cell = next(c for c in json.loads((NOTEBOOKS / nb).read_text())["cells"]
                if "parameters" in c.get("metadata", {}).get("tags", []))
    return {n.targets[0].id: ast.literal_eval(n.value)
            for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.Assign)}


def _defaults_differing(nb: str, cls) -> dict:
    import dataclasses
    out = {}
    for f in dataclasses.fields(cls):
        values = _parameter_values(nb)
        if f.name not in values or f.name in OWN_VALUES or (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if values[f.name] != default:
            out[f.name] = (values[f.name], default)
    return out


@pytest.mark.parametrize("nb, config", [
    ("02_preprocessing_demo.ipynb", "rsna_utils.image.preprocess.PreprocessConfig"),
    ("03_train.ipynb", "rsna_utils.learn.train_config.TrainConfig"),
    ("04_inference_submission.ipynb", "rsna_utils.infer.predict.PredictConfig")])
def test_notebook_parameters_default_to_their_config(nb, config):
    """A notebook run without a plan trains (preprocesses, predicts) with the settings' own
    defaults, spelled in the config; the plans say where they differ."""
    import importlib
    module, _, name = config.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert _defaults_differing(nb, cls) == {}, "notebook value, config default"


def test_the_defaults_check_can_fail(monkeypatch):
    from rsna_utils.learn.train_config import TrainConfig
    real = _parameter_values
    monkeypatch.setitem(globals(), "_parameter_values",
                        lambda nb: {**real(nb), "lr": 0.001, "pos_weight": 5.0})
    assert _defaults_differing("03_train.ipynb", TrainConfig) == {"lr": (0.001, 0.0003),
                                                                  "pos_weight": (5.0, 1.0)}


def test_demo_plan_runs_headless(tmp_path, synth_small):
    res = run_plan("demo", data=synth_small, runs=tmp_path, progress=False,
                   overrides=["epochs=1", "max_steps=2", "n_header_scan=30", "n_samples=6",
                              "workers=1", "03_train_resnet18.size=48"])
    names = [n["step"] for n in res["notebooks"]]
    assert names == ["01_eda", "02_preprocessing_demo", "03_train_resnet18", "03_train_resnext50",
                     "03_train_efficientnet", "03_train_efficientnet_breast",
                     "04_inference_submission", "05_explain_evaluate"]
    min_figures = {"01_eda": 5, "02_preprocessing_demo": 3, "03_train_resnet18": 2,
                   "03_train_resnext50": 2, "03_train_efficientnet": 2,
                   "03_train_efficientnet_breast": 2, "04_inference_submission": 1,
                   "05_explain_evaluate": 4}
    for n in res["notebooks"]:
        nb = nbformat.read(n["notebook"], as_version=4)
        outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outs if o.get("output_type") == "error"]
        figures = sum("image/png" in o.get("data", {}) for o in outs)
        assert figures >= min_figures[n["step"]], (n["step"], figures)
        assert Path(n["notebook"]).with_suffix(".html").is_file(), n["notebook"]
    report = res.get("report")
    assert report and Path(report).name == "index.html" and Path(report).is_file(), report
    sub = pd.read_csv(res["submission"])
    sample = pd.read_csv(synth_small / "sample_submission.csv")
    assert list(sub.prediction_id) == list(sample.prediction_id)
    assert set(sub.cancer) <= {0, 1}                   # binarised at the out-of-fold threshold
    infer = next(n["notebook"] for n in res["notebooks"] if n["step"] == "04_inference_submission")
    printed = "".join(o.get("text", "") for c in nbformat.read(infer, 4).cells
                      if c.cell_type == "code" for o in c.get("outputs", []))
    assert "out-of-fold:" in printed and "hidden test" in printed and "exported 4" in printed
    explain = Path(res["run_dir"]) / "explain"
    views = pd.read_csv(explain / "exams" / "heatmaps.csv")
    assert len(views) and {"peak_x", "peak_y", "score"} <= set(views.columns)
    assert (explain / "exams" / "index.html").is_file()
    metrics = pd.read_csv(explain / "evaluation" / "metrics.csv")
    assert len(metrics) and any(c.endswith("_low") for c in metrics.columns)

    # the export is all the submit plan needs: the same submission, without the training runs
    export = Path(res["run_dir"]) / "rsna-models"
    ens = json.loads((export / "ensemble.json").read_text())
    assert len(ens["checkpoints"]) == 4 and all((export / c).is_file() for c in ens["checkpoints"])
    import torch
    breast = torch.load(export / next(c for c in ens["checkpoints"] if "breast" in c),
                        weights_only=True)
    assert breast["level"] == "breast"      # the breast-level member travels as any checkpoint
    moved = tmp_path / "elsewhere" / "rsna-models"
    moved.parent.mkdir()
    export.rename(moved)            # the copy on Kaggle knows nothing of the training run folder
    sub2 = run_plan("submit", data=synth_small, runs=tmp_path, progress=False,
                    overrides=[f"ensemble={moved}/ensemble.json", "device=cpu", "workers=1"])
    assert [n["step"] for n in sub2["notebooks"]] == ["04_inference_submission"]
    assert pd.read_csv(sub2["submission"]).equals(sub)


def test_a_failing_notebook_stops_the_plan_and_names_itself(tmp_path, synth_small):
    from rsna_utils.core.errors import RsnaError
    plan = tmp_path / "p.yaml"
    plan.write_text(json.dumps({"name": "bad", "steps": [
        {"notebook": "03_train.ipynb",
         "parameters": {"model": "no_such_net", "csv": str(synth_small / "train.csv")}},
        {"notebook": "01_eda.ipynb"}]}))
    with pytest.raises(RsnaError, match=r"notebook 03_train failed in cell \d+: RsnaError: unknown model .no_such_net"):
        run_plan(plan, data=synth_small, runs=tmp_path, progress=False)
    assert not (tmp_path / "bad" / "01_eda.ipynb").exists()


def test_the_kaggle_plan_stops_before_step_one_when_weights_are_not_attached(tmp_path):
    """No /kaggle/input/rsna-timm-weights here: the plan names every step that lacks its
    weights and the dataset to attach, and runs nothing (no EDA, no hours of preprocessing)."""
    from rsna_utils.core.errors import RsnaError
    with pytest.raises(RsnaError, match=r"plan kaggle: pretrained weights not found for 7 "
                                        r"step\(s\) \(03_train_resnet18_512x256_fold0: /kaggle/input/"
                                        r"rsna-timm-weights/resnet18;.*nothing was run: attach "
                                        r"the Kaggle dataset\(s\) rsna-timm-weights"):
        run_plan("kaggle", data=tmp_path / "data", runs=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.heavy                   # runs notebook 01 to its first failure
def test_the_kaggle_plan_takes_its_weights_from_the_weights_folder(tmp_path):
    """Off Kaggle, --weights DIR stands for the dataset: the check names DIR's sub-folders,
    and once they exist it passes (the plan then fails at its first step, on the missing data)."""
    from rsna_utils.core.errors import RsnaError
    w = tmp_path / "w"
    with pytest.raises(RsnaError, match=r"pretrained weights not found for 7 step\(s\) "
                                        r"\(03_train_resnet18_512x256_fold0: " + re.escape(str(w / "resnet18"))
                                        + r";.*run the plan with --weights DIR"):
        run_plan("kaggle", data=tmp_path / "data", runs=tmp_path / "runs", progress=False, weights=w)
    for m in ("resnet18", "resnext50_32x4d", "efficientnet_b2", "convnext_small"):
        (w / m).mkdir(parents=True)          # the public sources are not here: skipped
    with pytest.raises(RsnaError, match=r"notebook 01_eda failed"):
        run_plan("kaggle", data=tmp_path / "data", runs=tmp_path / "runs", progress=False, weights=w)


def test_a_relative_weights_folder_is_the_callers_and_a_placeholder_can_be_overridden(
        tmp_path, monkeypatch):
    """--weights w means ./w where the user typed it (the notebooks run elsewhere), and
    -p pretrained_path={weights}/x (not YAML) stays a string, not a parser traceback."""
    from rsna_utils.core.errors import RsnaError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RsnaError, match=re.escape(str(tmp_path / "w" / "resnet18")) + ";"):
        run_plan("kaggle", data="data", runs="runs", progress=False, weights="w")
    with pytest.raises(RsnaError, match=r"\(03_train_resnet18_512x256_fold0: "
                                        + re.escape(str(tmp_path / "w" / "other")) + ";"):
        run_plan("kaggle", data="data", runs="runs", progress=False, weights="w",
                 overrides=["03_train_resnet18_*.pretrained_path={weights}/other"])


def test_relative_weights_paths_resolve_where_the_notebooks_run(tmp_path, monkeypatch):
    from rsna_utils.app.notebooks import _check_weights, _kernel_cwd
    from rsna_utils.core.errors import RsnaError
    (_kernel_cwd() / "README.md").stat()               # a relative path that exists there
    monkeypatch.chdir(tmp_path)                         # ... and not in the caller's folder
    _check_weights("p", [("s1", {"pretrained_path": "README.md"}),
                         ("s2", {"pretrained_path": "pypi"}), ("s3", {})])
    with pytest.raises(RsnaError, match=r"plan p: .*\(s1: no/such/weights\); nothing was run: "
                                        r"put them there"):
        _check_weights("p", [("s1", {"pretrained_path": "no/such/weights"})])


def test_kaggle_plan_trains_every_fold_it_ensembles_and_binarises():
    d = load_plan("kaggle")
    train = {s["parameters"]["out"]: s["parameters"] for s in d["steps"] if s["notebook"] == "03_train.ipynb"}
    infer = [s for s in d["steps"] if s["notebook"] == "04_inference_submission.ipynb"][-1]["parameters"]
    used = [c.rsplit("/", 1)[0] for c in infer["checkpoints"]]
    assert set(used) <= set(train) and used == infer["oof_runs"]
    for model in {train[u]["model"] for u in used}:
        folds = sorted(train[u]["fold"] for u in used if train[u]["model"] == model)
        assert folds == list(range(train[used[0]]["folds"])), model
    assert infer["binarize_how"] == "threshold"
    assert all(p.get("pretrained_path") for p in train.values())
    assert max(p["size"][0] for p in train.values()) >= 1536
    assert all(p["size"][0] == 2 * p["size"][1] for p in train.values())
    assert all(p["split"] == "kfold" and p["device"] == "cuda" for p in train.values())
    assert infer["export_dir"] == "{run_dir}/rsna-models"
    # one kind of score: no flip in validation, so none in the submission (the ensemble's flip
    # follows it), as the 1st place
    assert all(p.get("tta") is False for p in train.values()) and infer.get("tta") is None
    # the winner's shape: the exported ensemble is ConvNeXt-small at 2048x1024 on 4 folds, max
    # pooling, head dropout, drop path 0.2, label smoothing, the heavy augmentation
    assert {train[u]["model"] for u in used} == {"convnext_small"} and len(used) == 4
    for u in used:
        p = train[u]
        assert p["size"] == [2048, 1024] and p["drop_path"] == 0.2
        assert p["extra"]["global_pool"] == "max" and p["extra"]["head_dropout"] == 0.5
        assert p["extra"]["aug_level"] == "heavy" and p["extra"]["label_smoothing"] > 0
    # the progression stays as cheap steps: one fold each
    cheap = [p for o, p in train.items() if o not in used]
    assert sorted(p["model"] for p in cheap) == ["efficientnet_b2", "resnet18", "resnext50_32x4d"]
    assert all(p["fold"] == 0 for p in cheap)
    # more data: the public sources, optional, CBIS-DDSM and CMMD at half weight
    src = {x["name"]: x for x in d["sources"]}
    assert set(src) == {"rsna", "vindr", "cbis-ddsm", "cmmd"}
    assert src["cbis-ddsm"]["weight"] == src["cmmd"]["weight"] == 0.5
    assert all(x.get("optional") for n, x in src.items() if n != "rsna")
    assert d["budget_hours"] == 24 and d["variants"]["12h"]["budget_hours"] == 12


def test_submit_plan_reads_only_the_exported_ensemble_and_the_test_data():
    d = load_plan("submit")
    assert [s["notebook"] for s in d["steps"]] == ["04_inference_submission.ipynb"]
    p = d["steps"][0]["parameters"]
    assert p["ensemble"] == "{data}/../rsna-models/ensemble.json"
    assert not {"oof_runs", "checkpoints", "export_dir", "labels"} & set(p)
    assert p["images"] == "{data}/test_images" and p["csv"] == "{data}/test.csv"
    assert p["out"] == "{run_dir}/submission.csv"
    # the flip TTA follows the ensemble's out-of-fold scores (the kaggle plan validates without)
    assert p["binarize_how"] == "threshold" and "tta" not in p and p["device"] == "cuda"
    paths = [v for v in p.values() if isinstance(v, str) and "/" in v]
    assert all(v.startswith(("{data}/", "{run_dir}/")) and "train" not in v for v in paths), paths


def test_on_kaggle_the_submission_lands_where_kaggle_scores_it(tmp_path, monkeypatch):
    working = tmp_path / "working"
    monkeypatch.setenv("KAGGLE_WORKING", str(working))
    for plan in ("kaggle", "submit"):
        (working / plan).mkdir(parents=True)
        (working / plan / "submission.csv").write_text(f"prediction_id,cancer\n1_L,0\n# {plan}\n")
        r = run_plan(plan, data=tmp_path, runs=working, only=["no-such-step"], progress=False)
        assert r["submission"] == str(working / "submission.csv")
        assert (working / "submission.csv").read_text().endswith(f"# {plan}\n")
    other = run_plan("kaggle", data=tmp_path, runs=tmp_path / "elsewhere", only=["x"], progress=False)
    assert other["submission"] is None


def test_demo_with_a_real_plan_refuses_a_folder_without_train_csv(tmp_path, capsys, monkeypatch):
    """`make demo PLAN=kaggle DATA=<typo>` must not quietly train the kaggle plan on synthetic
    patients generated into the mistyped folder: it names the missing train.csv and stops."""
    from rsna_utils.app.cli import main
    data = tmp_path / "rsna"
    rc = main(["demo", "--plan", "kaggle", "--data", str(data), "--runs", str(tmp_path / "runs"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(data / "train.csv") in err and "kaggle" in err and "PLAN=demo" in err
    assert not data.exists() and not (tmp_path / "runs").exists()
    # the demo plan named by its file still generates; a mistyped plan is named as such
    assert main(["demo", "--plan", "kagle", "--data", str(data), "--quiet"]) == 2
    assert "plan 'kagle' not found" in capsys.readouterr().err and not data.exists()
    made = []
    monkeypatch.setattr("rsna_utils.sources.synth.synthesize", lambda d, **k: made.append(d))
    monkeypatch.setattr("rsna_utils.app.notebooks.run_plan", lambda *x, **k: dict(
        run_dir="r", notebooks=[], submission=None))
    assert main(["demo", "--plan", str(NOTEBOOKS / "plans" / "demo.yaml"), "--data", str(data),
                 "--quiet"]) == 0 and made == [str(data)]


def test_the_explain_notebook_parameters_are_its_configs_fields():
    """05 takes `rsna explain`'s and `rsna evaluate`'s settings by their config names (it read
    `meta_csv` where the flag is --meta) and their defaults, but for its own small values."""
    import papermill as pm

    from rsna_utils.reports.evaluate import EvaluateConfig
    from rsna_utils.reports.exam import ExplainConfig
    params = set(pm.inspect_notebook(str(NOTEBOOKS / "05_explain_evaluate.ipynb")))
    assert params - set(ExplainConfig.field_names()) - set(EvaluateConfig.field_names()) == set()
    nb = "05_explain_evaluate.ipynb"
    differ = {**_defaults_differing(nb, ExplainConfig), **_defaults_differing(nb, EvaluateConfig)}
    assert differ == {"limit": (8, None), "meta": ("data/synthetic/train.csv", None)}
