"""`rsna export --format onnx` and `rsna predict --runtime onnx` (issue 41): every backbone family
of the plans scores through onnxruntime as through eager PyTorch within `engine.TOLERANCE`
(random weights at 64x32, nothing downloaded); what cannot run exported (onnxruntime or its
provider missing, a layer that does not export, an export whose scores differ) is one line and
the member in eager PyTorch; a contract of another checkpoint is refused."""
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from rsna_utils.core import errors
from rsna_utils.core.errors import RsnaError
from rsna_utils.infer import engine
from rsna_utils.infer.engine import TOLERANCE, attach_engines, providers
from rsna_utils.infer.export import ExportConfig, export_member, export_onnx, random_checkpoint
from rsna_utils.infer.predict import load_models
from rsna_utils.learn.checkpoint import Checkpoint, InputSpec, cancer_probability

pytest.importorskip("onnxruntime")
CPU = torch.device("cpu")
SIZE = (64, 32)

# (timm name, level, pooling): the backbone families of the plans. ConvNeXt-Small exports in
# about 25 s on 2 cores, so the default run takes ConvNeXt-Atto (the same blocks: depthwise 7x7,
# LayerNorm, GELU MLP, layer scale) and the slow run (-m slow) the Small as well; likewise
# EfficientNet-Lite0 by default, B2 (about a minute here) and ResNeXt-50 in the slow run.
# `make test-fast` keeps ResNet18 alone; `make test` runs Lite0, Atto and the breast model too.
FAMILIES = [
    ("resnet18", "image", "gem"),
    pytest.param("resnext50_32x4d", "image", "gem", marks=pytest.mark.slow),
    pytest.param("tf_efficientnet_lite0", "image", "gem", marks=pytest.mark.heavy),
    pytest.param("efficientnet_b2", "image", "gem", marks=pytest.mark.slow),
    pytest.param("convnext_atto", "image", "max", marks=pytest.mark.heavy),
    pytest.param("convnext_small", "image", "max", marks=pytest.mark.slow),
    pytest.param("resnet18", "breast", "gem", marks=pytest.mark.heavy),
]


def _scores(m, x, tta=True):
    """What predict takes from a member for the batch x: the cancer probability (image
    models, with the flip), a breast model's per-view features pooled as a one-view breast."""
    with torch.inference_mode():
        if m.level == "breast":
            f = m.model.features(x)
            out, _ = m.model.pool(f[:, None].float(), torch.ones(len(x), 1, dtype=torch.bool))
            return torch.sigmoid(out[:, 0]).numpy(), f.numpy()
        return cancer_probability(m.model, x, tta).numpy(), None


@pytest.mark.parametrize("name, level, pool", FAMILIES)
def test_every_backbone_family_scores_as_pytorch(tmp_path, name, level, pool):
    ck = random_checkpoint(tmp_path / name / "best.pt", name, SIZE, level, pool)
    r = export_onnx(ExportConfig(out=str(tmp_path / "onnx"), checkpoints=[str(ck)]))
    (c,) = r["members"]
    assert c["onnx"] and c["export_check"] <= TOLERANCE["fp32"], c
    (ref,), _ = load_models([ck], CPU)
    (got,), _ = load_models([ck], CPU)
    lines = []
    assert attach_engines([got], CPU, tmp_path / "onnx", say=lines.append) == ["onnx"]
    assert isinstance(got.model, engine.OnnxModel) and "1 of 1 member(s)" in lines[-1]
    x = torch.randn(5, 3, *SIZE, generator=torch.Generator().manual_seed(1))   # batch 5: dynamic
    p_ref, f_ref = _scores(ref, x)
    p_got, f_got = _scores(got, x)
    assert np.ptp(p_ref) > 0.1, "scores too alike for the comparison to mean anything"
    assert np.abs(p_ref - p_got).max() <= TOLERANCE["fp32"]
    if f_ref is not None:
        assert np.abs(f_ref - f_got).max() <= 1e-3 * max(1.0, np.abs(f_ref).max())


def test_the_comparison_can_fail(tmp_path):
    """The same check on an export of other weights than the model's: caught."""
    a = random_checkpoint(tmp_path / "a" / "best.pt", "resnet18", SIZE, seed=0)
    b = random_checkpoint(tmp_path / "b" / "best.pt", "resnet18", SIZE, seed=1)
    export_onnx(ExportConfig(out=str(tmp_path / "onnx"), checkpoints=[str(b)]))
    (m,), _ = load_models([a], CPU)
    contract = engine.read_contract(tmp_path / "onnx" / f"b_best{engine.CONTRACT_SUFFIX}")
    other = engine.OnnxModel(engine.make_session(tmp_path / "onnx" / contract["onnx"],
                                                 ["CPUExecutionProvider"]), m.model, "logits")
    assert engine.probe_difference(m.model, other, contract, CPU) > TOLERANCE["fp32"]


def test_contract_says_the_input_and_the_source(tmp_path):
    ck = random_checkpoint(tmp_path / "r18" / "fold0" / "best.pt", "resnet18", SIZE)
    export_onnx(ExportConfig(out=str(tmp_path / "out"), checkpoints=[str(ck)]))
    c = json.loads((tmp_path / "out" / "fold0_best.onnx.json").read_text())
    assert c["size"] == [64, 32] and c["channels"] == 3 and c["level"] == "image"
    assert c["model_name"] == "resnet18" and c["threshold"] == 0.5
    assert c["norm"][0] == pytest.approx([0.485, 0.456, 0.406])
    assert c["resize"] == {"mode": "pad", "filter": "area_shrink_linear_enlarge"}
    # the input is the checkpoint's InputSpec, spelled as the checkpoint spells it
    spec = Checkpoint.load(ck).input
    assert {k: c[k] for k in InputSpec.KEYS} == spec.to_dict()
    assert engine.contract_input(c) == spec
    assert c["checkpoint_sha256"] == engine.sha256(ck) and c["onnx"] == "fold0_best.onnx"
    ens = json.loads((tmp_path / "out" / "ensemble.json").read_text())
    assert ens["engines"] == ["fold0_best.onnx"]
    assert ens["checkpoints"] == ["../r18/fold0/best.pt"]


def test_an_export_of_another_checkpoint_is_refused_with_the_fix(tmp_path):
    ck = random_checkpoint(tmp_path / "run" / "best.pt", "resnet18", SIZE, seed=0)
    export_onnx(ExportConfig(out=str(tmp_path / "onnx"), checkpoints=[str(ck)], check=False))
    random_checkpoint(ck, "resnet18", SIZE, seed=5)            # retrained in place
    models, _ = load_models([ck], CPU)
    with pytest.raises(RsnaError, match=r"exported from another checkpoint.*re-export: rsna "
                                        r"export --format onnx --checkpoints"):
        attach_engines(models, CPU, tmp_path / "onnx")


def test_a_layer_that_does_not_export_is_named_and_runs_in_pytorch(tmp_path, capsys):
    ck = random_checkpoint(tmp_path / "run" / "best.pt", "resnet18", SIZE)
    (m,), _ = load_models([ck], CPU)

    class Spectral(torch.nn.Module):          # aten::fft_rfft2: no ONNX symbolic in opset 17
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0 * torch.fft.rfft2(x).abs().mean()
    m.model = Spectral(m.model).eval()
    c = export_member(m, tmp_path, "spectral")
    assert c["onnx"] is None and "fft_rfft2" in c["error"] and "eager PyTorch" in c["line"]
    assert not (tmp_path / "spectral.onnx").exists()
    assert "Torch IR graph" not in capsys.readouterr().out        # one line, not the graph
    lines = []
    assert attach_engines([m], CPU, tmp_path, say=lines.append) == ["torch"]
    assert len(lines) == 1 and "runs in eager PyTorch" in lines[0] and "fft_rfft2" in lines[0]
    assert isinstance(m.model, Spectral)


def test_missing_onnxruntime_or_gpu_provider_falls_back_in_one_line(tmp_path, monkeypatch,
                                                                       capsys):
    ck = random_checkpoint(tmp_path / "run" / "best.pt", "resnet18", SIZE)
    models, _ = load_models([ck], CPU)
    before = models[0].model
    monkeypatch.setattr(errors, "_SAID", set())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # import fails
    assert attach_engines(models, CPU) == ["torch"] and models[0].model is before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime is not installed" in err[0] and "eager PyTorch" in err[0]
    monkeypatch.delitem(sys.modules, "onnxruntime")
    plist, why = providers("cuda")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert plist is None and "no CUDA execution provider" in why and "onnxruntime-gpu" in why


def test_no_export_beside_a_checkpoint_is_named(tmp_path):
    ck = random_checkpoint(tmp_path / "run" / "best.pt", "resnet18", SIZE)
    models, _ = load_models([ck], CPU)
    lines = []
    assert attach_engines(models, CPU, say=lines.append) == ["torch"]
    assert "no export of it" in lines[0] and "rsna export --format onnx" in lines[0]


def test_export_needs_one_source_of_members(tmp_path):
    with pytest.raises(RsnaError, match="either as --checkpoints"):
        ExportConfig(out=str(tmp_path))
    from rsna_utils.app.cli import main
    assert main(["export", "--out", str(tmp_path), "--format", "onnx"]) == 2


def test_rsna_predict_runtime_onnx_gives_the_pytorch_submission(tmp_path, synth_small, capsys):
    """The whole command: an image and a breast member exported by `rsna export --ensemble`,
    predicted with --runtime onnx: every image's score within the tolerance of --runtime torch."""
    from rsna_utils.app.cli import main
    from rsna_utils.infer.ensemble import Ensemble
    image = random_checkpoint(tmp_path / "r18" / "best.pt", "resnet18", SIZE)
    breast = random_checkpoint(tmp_path / "r18b" / "best.pt", "resnet18", SIZE, "breast", seed=2)
    Ensemble({"checkpoints": ["r18/best.pt", "r18b/best.pt"], "threshold": 0.5,
              "binarize": "threshold", "agg": "mean",
              "tta": False}).write(tmp_path / "ensemble.json")
    assert main(["export", "--format", "onnx", "--ensemble", str(tmp_path / "ensemble.json"),
                 "--out", str(tmp_path / "engines")]) == 0
    assert "exported 2 of 2 member(s)" in capsys.readouterr().out
    common = ["predict", "--images", str(synth_small / "test_images"), "--csv",
              str(synth_small / "test.csv"), "--workers", "0", "--quiet", "--output",
              "probability", "--ensemble", str(tmp_path / "engines" / "ensemble.json")]
    assert main(common + ["--out", str(tmp_path / "torch.csv")]) == 0
    assert main(common + ["--out", str(tmp_path / "onnx.csv"), "--runtime", "onnx"]) == 0
    err = capsys.readouterr().err
    assert "runtime onnx: 2 of 2 member(s) through onnxruntime" in err
    a = pd.read_csv(tmp_path / "torch_images.csv")
    b = pd.read_csv(tmp_path / "onnx_images.csv")
    assert a.prediction.notna().all() and np.ptp(a.prediction) > 0.01
    assert np.abs(a.prediction - b.prediction).max() <= TOLERANCE["fp32"]
    sa, sb = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "onnx.csv")
    assert list(sa.prediction_id) == list(sb.prediction_id)
    assert np.abs(sa.cancer - sb.cancer).max() <= TOLERANCE["fp32"]
    # --runtime tensorrt on the CPU: said, then the CPU provider, the same scores
    assert main(common + ["--out", str(tmp_path / "trt.csv"), "--runtime", "tensorrt"]) == 0
    err = capsys.readouterr().err
    assert "runtime tensorrt: 2 of 2 member(s) through onnxruntime" in err
    assert pd.read_csv(tmp_path / "trt.csv").equals(sb)


def test_an_ensemble_json_already_in_out_is_kept_unless_exported_in_place(tmp_path):
    ck = random_checkpoint(tmp_path / "run" / "best.pt", "resnet18", SIZE)
    other = {"checkpoints": ["run/best.pt"], "threshold": 0.3, "agg": "mean"}
    (tmp_path / "ensemble.json").write_text(json.dumps(other))
    with pytest.raises(RsnaError, match="not an earlier `rsna export`"):
        export_onnx(ExportConfig(out=str(tmp_path), checkpoints=[str(ck)], check=False))
    assert json.loads((tmp_path / "ensemble.json").read_text()) == other
    export_onnx(ExportConfig(out=str(tmp_path), ensemble=str(tmp_path / "ensemble.json"),
                             check=False))                  # in place: its engines added
    ens = json.loads((tmp_path / "ensemble.json").read_text())
    assert ens["threshold"] == 0.3 and ens["engines"] == ["run_best.onnx"]
    assert ens["checkpoints"] == ["run/best.pt"]


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory):
    """A ResNet18 checkpoint (run/best.pt) and its export (onnx/), made once for the tests that
    each edit a copy."""
    root = tmp_path_factory.mktemp("exported")
    ck = random_checkpoint(root / "run" / "best.pt", "resnet18", SIZE, seed=0)
    export_onnx(ExportConfig(out=str(root / "onnx"), checkpoints=[str(ck)], check=False))
    return root


def _exported(tmp_path, once):
    """A copy of `exported_once` in tmp_path: (the checkpoint, its contract)."""
    shutil.copytree(once, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run" / "best.pt", tmp_path / "onnx" / f"run_best{engine.CONTRACT_SUFFIX}"


def test_a_contract_of_the_first_exports_still_loads_and_scores(tmp_path, exported_once):
    """A contract as the first `rsna export` wrote it (norm as {"mean", "std"}) reads back into
    the checkpoint's InputSpec, and its member runs exported with the PyTorch scores."""
    ck, path = _exported(tmp_path, exported_once)
    c = json.loads(path.read_text())
    c["norm"] = {"mean": c["norm"][0], "std": c["norm"][1]}
    path.write_text(json.dumps(c, indent=2))
    assert engine.contract_input(engine.read_contract(path)) == Checkpoint.load(ck).input
    (ref,), _ = load_models([ck], CPU)
    (got,), _ = load_models([ck], CPU)
    assert attach_engines([got], CPU, tmp_path / "onnx", say=lambda line: None) == ["onnx"]
    assert got.input == ref.input
    x = engine.probe_batch(got.input, CPU, 4)
    assert np.abs(_scores(ref, x)[0] - _scores(got, x)[0]).max() <= TOLERANCE["fp32"]


@pytest.mark.parametrize("key, value", [("norm", [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]),
                                        ("size", [32, 16]), ("level", "breast")])
def test_a_contract_whose_input_drifted_from_the_checkpoint_runs_in_pytorch(tmp_path, key, value,
                                                                             exported_once):
    """The contract's InputSpec is what the export's batches are made from: one that is not
    the checkpoint's (edited, or written by an exporter that spelled it otherwise) is named
    and the member stays in PyTorch, whose input is the checkpoint's."""
    ck, path = _exported(tmp_path, exported_once)
    c = json.loads(path.read_text())
    c[key] = value
    path.write_text(json.dumps(c, indent=2))
    (m,), _ = load_models([ck], CPU)
    before, lines = m.model, []
    assert attach_engines([m], CPU, tmp_path / "onnx", say=lines.append) == ["torch"]
    assert m.model is before and m.input == Checkpoint.load(ck).input
    assert len(lines) == 1 and "contract's input" in lines[0] and "re-export" in lines[0]


def test_the_probe_batch_is_made_as_predict_makes_its_batches():
    """`probe_batch`: random images through predict's resize and normalisation."""
    from rsna_utils.infer.scoring import raw_batch
    from rsna_utils.learn.data import device_input
    spec = InputSpec((64, 32), 3, ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4)))
    x = engine.probe_batch(spec, CPU, 3)
    assert x.shape == (3, 3, 64, 32) and x.dtype == torch.float32
    imgs = [np.random.default_rng(0).integers(0, 256, (96, 32), dtype=np.uint8)]
    want = device_input(raw_batch(imgs, (64, 32)), None, spec.norm, 3)
    assert torch.equal(x[:1], want)
    assert float(x[:, :, :, 30:].flatten(2).std(2).max()) == 0   # the padding: one value


def test_onnxruntime_gpu_is_an_install_line_of_the_gpu_requirements_never_a_requirement():
    """onnxruntime-gpu replaces onnxruntime (one package): the GPU requirement files (which CI
    installs beside requirements.txt) state the swap as a line to run, with engine's pin for
    their CUDA, and never require it; the missing-provider line names the same swap."""
    from rsna_utils.app.bundle import read_pins
    repo = REPO
    assert engine.ORT_PIN in (repo / "requirements.txt").read_text().splitlines()
    for cuda, name in (("13", "requirements-gpu.txt"), ("12", "requirements-gpu-cu12.txt")):
        text = (repo / name).read_text()
        line = f"pip uninstall -y onnxruntime && pip install {engine.ORT_GPU_PINS[cuda]}"
        assert line in text and line in (repo / "docs" / "gpu.md").read_text(), name
        assert not [p for p in read_pins(repo / name) if "onnxruntime" in p], name
        assert engine.gpu_install(f"{cuda}.4") == f"{line} (docs/gpu.md)"
    assert "1.31.1 (CUDA 13) or" in engine.gpu_install("")


def test_a_cuda_provider_that_does_not_load_is_named_not_run_on_the_cpu(tmp_path, monkeypatch,
                                                                         exported_once):
    """onnxruntime-gpu lists CUDAExecutionProvider even where its libraries do not load (a cu12
    wheel beside CUDA 13, seen on this machine with the bundle's swap), and then builds the
    session on the CPU provider without an error. On a GPU that member would score on the CPU:
    it stays in eager PyTorch with one line instead. Here the CPU wheel plays the part: asked for
    CUDA it builds a CPU session, as the GPU wheel does when its provider fails to load."""
    ck, _ = _exported(tmp_path, exported_once)
    monkeypatch.setattr(engine, "providers",
                        lambda device_type: (["CUDAExecutionProvider", "CPUExecutionProvider"], ""))
    models, _ = load_models([ck, ck], CPU)
    before, lines = [m.model for m in models], []
    assert attach_engines(models, torch.device("cuda"), tmp_path / "onnx",
                          say=lines.append) == ["torch", "torch"]
    assert [m.model for m in models] == before and len(lines) == 1      # once, for every member
    assert "lists its CUDA provider but could not load it" in lines[0]
    assert lines[0].endswith("every member in eager PyTorch")
    assert "runs on CPUExecutionProvider" in lines[0] and "pip install onnxruntime-gpu" in lines[0]
    assert engine.gpu_provider_lost(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda") is None
    assert engine.gpu_provider_lost(["CPUExecutionProvider"], "cpu") is None


def test_runtime_tensorrt_without_a_gpu_says_so_once_and_runs_on_the_cpu_provider(
        tmp_path, monkeypatch, capsys, exported_once):
    ck, _ = _exported(tmp_path, exported_once)
    monkeypatch.setattr(errors, "_SAID", set())
    (ref,), _ = load_models([ck], CPU)
    models, _ = load_models([ck], CPU)
    lines = []
    assert attach_engines(models, CPU, tmp_path / "onnx", say=lines.append,
                          tensorrt=True) == ["onnx"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["runtime tensorrt: TensorRT needs a CUDA device (this one is cpu); the "
                   "members run through onnxruntime's CPU provider where they can"]
    assert lines[-1].startswith("runtime tensorrt: 1 of 1 member(s) through onnxruntime")
    assert all(m.model.max_batch is None for m in models)      # no TensorRT profile to keep to
    x = engine.probe_batch(ref.input, CPU, 3)
    assert np.abs(_scores(ref, x)[0] - _scores(models[0], x)[0]).max() <= TOLERANCE["fp32"]


def test_a_tensorrt_provider_that_does_not_load_or_build_is_named_and_cuda_taken(
        tmp_path, monkeypatch, exported_once):
    """onnxruntime-gpu lists its TensorRT provider whether or not TensorRT loads, and builds
    the session without it when it does not: said once, the CUDA provider runs the members. An
    engine TensorRT cannot build (an unsupported layer) costs that member the provider, not the
    run. Here the CPU wheel plays the GPU wheel (asked for TensorRT and CUDA it builds a CPU
    session), so the CUDA provider is then lost too, and the members stay in PyTorch."""
    ck, _ = _exported(tmp_path, exported_once)
    monkeypatch.setattr(engine, "providers",
                        lambda device_type: (["CUDAExecutionProvider", "CPUExecutionProvider"], ""))
    monkeypatch.setattr(engine, "tensorrt_why_not", lambda device_type: None)
    monkeypatch.setattr(engine, "torch_cuda", lambda: "13.0")
    import rsna_utils.infer.trt_engine as trt
    monkeypatch.setattr(trt, "torch_cuda", lambda: "13.0")
    monkeypatch.setattr(engine, "tensorrt_cache", lambda base, device: tmp_path / "cache")
    asked = []
    real = engine.make_session

    def session(onnx, plist, threads=None):
        asked.append([p if isinstance(p, str) else p[0] for p in plist])
        return real(onnx, plist, threads)
    monkeypatch.setattr(engine, "make_session", session)
    models, _ = load_models([ck], CPU)
    lines = []
    assert attach_engines(models, torch.device("cuda"), tmp_path / "onnx", say=lines.append,
                          tensorrt=True) == ["torch"]
    assert asked == [["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert lines.pop(0) == ("runtime tensorrt: TensorRT builds each member's engine as it loads "
                            f"(minutes each, once for this GPU and version: kept in "
                            f"{tmp_path / 'cache'})")
    assert lines[0].startswith("runtime tensorrt: onnxruntime lists its TensorRT provider but "
                               "could not load it (the session runs on CPUExecutionProvider)")
    assert lines[0].endswith("pip install --extra-index-url https://pypi.nvidia.com "
                             "tensorrt-cu13-libs==10.16.1.11 (docs/gpu.md)")
    assert "lists its CUDA provider but could not load it" in lines[1] and len(lines) == 2
    (tmp_path / "cache").mkdir()                      # engines built before, on this GPU
    (tmp_path / "cache" / "TensorrtExecutionProvider_TRTKernel_graph_0_fp16_sm75.engine").touch()

    def refuses(onnx, plist, threads=None):                      # TensorRT cannot build it
        asked.append([p if isinstance(p, str) else p[0] for p in plist])
        if not isinstance(plist[0], str):
            raise RuntimeError("TensorRT EP failed to create engine from network\nmore")
        return real(onnx, plist, threads)
    monkeypatch.setattr(engine, "make_session", refuses)
    asked.clear()
    lines.clear()
    models, _ = load_models([ck], CPU)
    assert attach_engines(models, torch.device("cuda"), tmp_path / "onnx", say=lines.append,
                          tensorrt=True) == ["torch"]
    assert asked == [["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                     ["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert lines.pop(0) == ("runtime tensorrt: TensorRT engines of this GPU and version in "
                            f"{tmp_path / 'cache'}")
    assert lines[0] == (f"{ck}: TensorRT could not build run_best.onnx (RuntimeError: TensorRT "
                        "EP failed to create engine from network); it runs on onnxruntime's "
                        "CUDA provider")


def test_a_batch_larger_than_the_engines_profile_is_run_in_parts(tmp_path, exported_once):
    ck, _ = _exported(tmp_path, exported_once)
    models, _ = load_models([ck], CPU)
    attach_engines(models, CPU, tmp_path / "onnx", say=lambda line: None)
    whole = models[0].model
    calls = []
    parts = engine.OnnxModel(whole.session, whole.torch_model, whole.graph, max_batch=2)
    run = parts.session.run
    parts.session = type("S", (), {"run": lambda self, out, feed: calls.append(
        len(next(iter(feed.values())))) or run(out, feed)})()
    x = engine.probe_batch(models[0].input, CPU, 5)
    assert torch.allclose(parts(x), whole(x), atol=1e-6) and calls == [2, 2, 1]
