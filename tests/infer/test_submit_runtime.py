"""The submit plan with `runtime: onnx` (issue 41): the Kaggle models folder exported in place
by `rsna export --format onnx`, then the inference notebook's own cells, with the submit plan's
parameters (`plan_steps`), up to its `predict`: the submission equals `runtime: torch`'s (the
same rows, the same binary column; every image's probability within `engine.TOLERANCE`)."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna_utils.app.notebooks import find_notebooks, plan_steps
from rsna_utils.infer.engine import TOLERANCE
from rsna_utils.infer.ensemble import Ensemble
from rsna_utils.infer.export import random_checkpoint

pytest.importorskip("onnxruntime")
NOTEBOOK = find_notebooks() / "04_inference_submission.ipynb"
SIZE = (64, 32)
# the submit plan's Kaggle settings (two T4s, 4 workers) as this CPU runs them
ON_CPU = ["device=cpu", "shards=1", "workers=0", "batch_size=8"]


@pytest.fixture(scope="module")
def kaggle_inputs(tmp_path_factory, synth_small):
    """/kaggle/input as the submit plan reads it: the competition data ({data}) and beside it
    rsna-models (an image and a breast member with ensemble.json), exported in place."""
    from rsna_utils.app.cli import main
    root = tmp_path_factory.mktemp("kaggle_input")
    data = root / "rsna-breast-cancer-detection"
    data.mkdir()
    for name in ("test_images", "test.csv", "sample_submission.csv"):
        os.symlink(synth_small / name, data / name)
    models = root / "rsna-models"
    random_checkpoint(models / "r18_fold0_best.pt", "resnet18", SIZE)
    random_checkpoint(models / "r18b_fold0_best.pt", "resnet18", SIZE, "breast", seed=2)
    Ensemble({"checkpoints": ["r18_fold0_best.pt", "r18b_fold0_best.pt"], "threshold": 0.5,
              "binarize": "threshold", "agg": "mean", "tta": False}).write(models / "ensemble.json")
    assert main(["export", "--format", "onnx", "--ensemble", str(models / "ensemble.json"),
                 "--out", str(models)]) == 0
    # the cut in the widest gap between the breasts' scores (random heads): both classes
    probs = root / "probability.csv"
    assert main(["predict", "--images", str(data / "test_images"), "--csv",
                 str(data / "test.csv"), "--workers", "0", "--quiet", "--output", "probability",
                 "--ensemble", str(models / "ensemble.json"), "--out", str(probs)]) == 0
    p = np.sort(pd.read_csv(probs).cancer.to_numpy())
    k = int(np.argmax(np.diff(p))) + 1
    assert p[k] - p[k - 1] > 10 * TOLERANCE["fp32"], "no clear cut between the breasts"
    ens = json.loads((models / "ensemble.json").read_text())
    ens["threshold"] = float(p[k - 1] + p[k]) / 2
    (models / "ensemble.json").write_text(json.dumps(ens, indent=2))
    return data


def _notebook_submission(data: Path, runs: Path, runtime: str) -> Path:
    """The submit plan's step run as papermill runs it, without the kernel: the parameters
    cell, the plan's parameters over it, then the notebook's code cells up to its predict."""
    _, _, todo, _ = plan_steps("submit", data=data, runs=runs, name=f"submit_{runtime}",
                               overrides=[*ON_CPU, f"runtime={runtime}"])
    (_, _, nb, params), = todo
    assert nb.name == NOTEBOOK.name
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    Path(params["out"]).parent.mkdir(parents=True, exist_ok=True)
    ns: dict = {}
    for c in cells:
        exec(compile("".join(c["source"]), nb.name, "exec"), ns)
        if "parameters" in c["metadata"].get("tags", []):
            ns.update(params)                    # papermill's injected cell
        if "result" in ns:                       # the cell that predicts
            break
    assert ns["cfg"].runtime == runtime and Path(params["out"]).is_file()
    return Path(params["out"])


def test_submit_plan_with_runtime_onnx_gives_the_torch_submission(kaggle_inputs, tmp_path,
                                                                   capfd):
    torch_csv = _notebook_submission(kaggle_inputs, tmp_path, "torch")
    capfd.readouterr()
    onnx_csv = _notebook_submission(kaggle_inputs, tmp_path, "onnx")
    err = capfd.readouterr().err
    assert "runtime onnx: 2 of 2 member(s) through onnxruntime" in err
    a, b = pd.read_csv(torch_csv), pd.read_csv(onnx_csv)
    assert list(a.columns) == list(b.columns) == ["prediction_id", "cancer"]
    assert list(a.prediction_id) == list(b.prediction_id) and len(a) > 0
    assert set(a.cancer) == {0, 1}
    assert (a.cancer == b.cancer).all()
    ia = pd.read_csv(torch_csv.with_name("submission_images.csv"))
    ib = pd.read_csv(onnx_csv.with_name("submission_images.csv"))
    assert list(ia.image_id) == list(ib.image_id) and ia.prediction.notna().all()
    assert np.ptp(ia.prediction) > 0.01
    assert np.abs(ia.prediction - ib.prediction).max() <= TOLERANCE["fp32"]


def test_the_engines_default_to_the_exported_ensembles_folder(kaggle_inputs, tmp_path):
    """runtime onnx without `engines`: the folder of the ensemble the plan names, found through
    "{data}/../rsna-models" (resolved by the text, as Ensemble.read resolves it)."""
    from rsna_utils.infer import kaggle
    _, _, todo, _ = plan_steps("submit", data=kaggle_inputs, runs=tmp_path,
                               overrides=[*ON_CPU, "runtime=onnx"])
    params = todo[0][3]
    assert params["runtime"] == "onnx" and "engines" not in params
    ens = kaggle.ensemble_for_submission(params["ensemble"])
    cfg = kaggle.submission_config({**params, "engines": None}, ens, ens.predict_settings({}))
    assert cfg.runtime == "onnx"
    assert cfg.engines == str(kaggle_inputs.parent / "rsna-models")
    assert kaggle.submission_config(params, ens, {}).checkpoints == ens["checkpoints"]
    mine = kaggle.submission_config({**params, "engines": "elsewhere"}, ens, {})
    assert mine.engines == "elsewhere"


def test_the_training_plan_replaces_a_models_folder_exported_in_place(kaggle_inputs, tmp_path):
    """Running the training plan again rewrites rsna-models even after its in-place ONNX export
    (the .onnx files are of the old checkpoints: they go with them)."""
    import shutil

    from rsna_utils.infer import kaggle
    models = tmp_path / "rsna-models"
    shutil.copytree(kaggle_inputs.parent / "rsna-models", models)
    assert any(models.glob("*.onnx")) and any(models.glob("*.onnx.json"))
    ens = kaggle.ensemble_for_submission(models / "ensemble.json")
    ck = tmp_path / "run" / "best.pt"
    ck.parent.mkdir()
    shutil.copyfile(ens["checkpoints"][0], ck)
    kaggle.export_models({"checkpoints": [str(ck)], "threshold": 0.4}, models)
    assert sorted(p.name for p in models.iterdir()) == ["ensemble.json", "run_best.pt"]
