"""The notebook suite: thin (a test parses every cell), stored without outputs, and runnable
headless through the demo plan."""
import ast
import json

import nbformat
import pandas as pd
import pytest

from rsna_utils.notebooks import NOTEBOOKS, load_plan, run_plan

NBS = sorted(NOTEBOOKS.glob("*.ipynb"))
FORBIDDEN = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.Lambda,
             ast.AsyncFor)


def test_the_four_notebooks_exist_in_order():
    assert [p.name for p in NBS] == ["01_eda.ipynb", "02_preprocessing_demo.ipynb",
                                     "03_train.ipynb", "04_inference_submission.ipynb"]


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_notebooks_are_thin_and_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    for stmt in ast.parse(params[0].source).body:
        assert isinstance(stmt, ast.Assign), f"parameters cell: only assignments ({ast.dump(stmt)[:60]})"
        ast.literal_eval(stmt.value)   # literals only: raises otherwise
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, "strip outputs"
        tree = ast.parse(c.source)
        bad = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, FORBIDDEN)]
        assert not bad, f"logic belongs in rsna_utils, not a notebook: {bad} in\n{c.source}"
        assert len(c.source.splitlines()) <= 25


@pytest.mark.parametrize("plan", ["demo", "kaggle"])
def test_plans_name_real_parameters(plan):
    import papermill as pm
    d = load_plan(plan)
    for step in d["steps"]:
        declared = set(pm.inspect_notebook(str(NOTEBOOKS / step["notebook"])))
        assert set(step.get("parameters", {})) <= declared, step
    models = [s["parameters"].get("model") for s in d["steps"] if s["notebook"] == "03_train.ipynb"]
    order = list(dict.fromkeys(models))      # the progression, each model once (folds repeat it)
    assert order[0] == "resnet18" and order[1] == "resnext50_32x4d"
    assert "efficientnet" in order[2]


def test_demo_plan_runs_headless(tmp_path, synth_small):
    res = run_plan("demo", data=synth_small, runs=tmp_path, progress=False,
                   overrides=["epochs=1", "max_steps=2", "n_header_scan=30", "n_samples=6",
                              "workers=1", "03_train_resnet18.size=48"])
    names = [n["step"] for n in res["notebooks"]]
    assert names == ["01_eda", "02_preprocessing_demo", "03_train_resnet18", "03_train_resnext50",
                     "03_train_efficientnet", "04_inference_submission"]
    min_figures = {"01_eda": 5, "02_preprocessing_demo": 3, "03_train_resnet18": 2,
                   "03_train_resnext50": 2, "03_train_efficientnet": 2, "04_inference_submission": 1}
    for n in res["notebooks"]:
        nb = nbformat.read(n["notebook"], as_version=4)
        outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outs if o.get("output_type") == "error"]
        figures = sum("image/png" in o.get("data", {}) for o in outs)
        assert figures >= min_figures[n["step"]], (n["step"], figures)
    sub = pd.read_csv(res["submission"])
    sample = pd.read_csv(synth_small / "sample_submission.csv")
    assert list(sub.prediction_id) == list(sample.prediction_id)
    assert sub.cancer.between(0, 1).all()


def test_a_failing_notebook_stops_the_plan_and_names_itself(tmp_path, synth_small):
    from rsna_utils.errors import RsnaError
    plan = tmp_path / "p.yaml"
    plan.write_text(json.dumps({"name": "bad", "steps": [
        {"notebook": "03_train.ipynb", "parameters": {"model": "no_such_net", "data_dir": str(synth_small)}},
        {"notebook": "01_eda.ipynb"}]}))
    with pytest.raises(RsnaError, match=r"notebook 03_train failed in cell \d+: RsnaError: unknown model .no_such_net"):
        run_plan(plan, data=synth_small, runs=tmp_path, progress=False)
    assert not (tmp_path / "bad" / "01_eda.ipynb").exists()


def test_kaggle_plan_trains_every_fold_it_ensembles_and_binarises():
    d = load_plan("kaggle")
    train = {s["parameters"]["out_dir"]: s["parameters"] for s in d["steps"] if s["notebook"] == "03_train.ipynb"}
    infer = [s for s in d["steps"] if s["notebook"] == "04_inference_submission.ipynb"][-1]["parameters"]
    used = [c.rsplit("/", 1)[0] for c in infer["checkpoints"]]
    assert set(used) <= set(train) and used == infer["oof_runs"]
    for model in {train[u]["model"] for u in used}:
        folds = sorted(train[u]["fold"] for u in used if train[u]["model"] == model)
        assert folds == list(range(train[used[0]]["folds"])), model
    assert infer["binarize"] == "threshold"
    assert all(p.get("pretrained_path") for p in train.values())
    assert max(p["size"][0] for p in train.values()) >= 1536
    assert all(p["size"][0] == 2 * p["size"][1] for p in train.values())


def test_on_kaggle_the_submission_lands_where_kaggle_scores_it(tmp_path, monkeypatch):
    from rsna_utils.notebooks import run_plan
    working = tmp_path / "working"
    monkeypatch.setenv("KAGGLE_WORKING", str(working))
    (working / "kaggle").mkdir(parents=True)
    (working / "kaggle" / "submission.csv").write_text("prediction_id,cancer\n1_L,0\n")
    r = run_plan("kaggle", data=tmp_path, runs=working, only=["no-such-step"], progress=False)
    assert r["submission"] == str(working / "submission.csv")
    assert (working / "submission.csv").read_text().startswith("prediction_id,cancer")
    other = run_plan("kaggle", data=tmp_path, runs=tmp_path / "elsewhere", only=["x"], progress=False)
    assert other["submission"] is None
