"""`rsna predict --runtime tensorrt` (infer.trt_engine), on the CPU: what is asked of
onnxruntime's TensorRT provider, where its engines are kept, and what is probed before it is
asked for. That TensorRT builds and runs the engines needs a GPU (issue 42); what happens when
it does not is tested with the exports in tests/infer/test_export.py."""
from __future__ import annotations

import ctypes

import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer import trt_engine
from rsna_utils.learn.checkpoint import InputSpec


def _gpu(monkeypatch, name="Tesla T4", capability=(7, 5), trt="10.16.1.11"):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(trt_engine, "tensorrt_version", lambda: trt)


def test_the_provider_asks_for_fp16_a_cache_and_one_profile_up_to_the_largest_batch(tmp_path):
    spec = InputSpec(size=(512, 256), channels=3)
    name, opts = trt_engine.tensorrt_provider({"input": "x"}, spec, torch.device("cuda:1"),
                                              tmp_path)
    assert name == "TensorrtExecutionProvider" and opts["device_id"] == 1
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    b = trt_engine.TRT_BATCH
    assert opts["trt_profile_min_shapes"] == "x:1x3x512x256"
    assert opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == f"x:{b}x3x512x256"


def test_an_engine_built_for_another_gpu_or_tensorrt_is_kept_apart_never_loaded(tmp_path,
                                                                                 monkeypatch):
    """An engine runs on the GPU model and TensorRT version it was built with only: each pair
    has its own cache folder, so a cache brought from elsewhere is not found (a new engine is
    built) rather than loaded."""
    monkeypatch.delenv("RSNA_TRT_CACHE", raising=False)
    _gpu(monkeypatch)
    t4 = trt_engine.tensorrt_cache(tmp_path, "cuda")
    assert t4.parent == tmp_path / "trt-cache" and t4.is_dir()
    assert t4.name.startswith("Tesla_T4-sm75-trt10.16.1.11-ort")
    _gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    assert trt_engine.tensorrt_cache(tmp_path, "cuda") != t4
    _gpu(monkeypatch, trt="10.15.1.29")
    assert trt_engine.tensorrt_cache(tmp_path, "cuda") != t4
    _gpu(monkeypatch)
    assert trt_engine.tensorrt_cache(tmp_path, "cuda") == t4


def test_the_cache_goes_where_it_can_be_written(tmp_path, monkeypatch):
    """Beside the exports, else (a read-only Kaggle dataset) ~/.cache; RSNA_TRT_CACHE first;
    nowhere writable: one line naming each folder tried and the variable to set."""
    _gpu(monkeypatch)
    monkeypatch.setenv("RSNA_TRT_CACHE", str(tmp_path / "mine"))
    assert trt_engine.tensorrt_cache(tmp_path / "exports", "cuda").parent == tmp_path / "mine"
    monkeypatch.delenv("RSNA_TRT_CACHE")
    (tmp_path / "ro").write_text("a file, not a folder: nothing can be made under it")
    monkeypatch.setattr(trt_engine.Path, "home", lambda: tmp_path / "home")
    got = trt_engine.tensorrt_cache(tmp_path / "ro", "cuda")
    assert got.parent == tmp_path / "home" / ".cache" / "rsna_utils" / "trt-cache"
    monkeypatch.setattr(trt_engine.Path, "home", lambda: tmp_path / "ro")
    with pytest.raises(RsnaError, match="no writable folder for TensorRT's engines: .*ro/trt-cache"
                       ".*set RSNA_TRT_CACHE"):
        trt_engine.tensorrt_cache(tmp_path / "ro", "cuda")


def test_what_is_probed_before_the_provider_is_asked_for(tmp_path, monkeypatch):
    import onnxruntime as ort
    assert trt_engine.tensorrt_why_not("cpu") == "TensorRT needs a CUDA device (this one is cpu)"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    why = trt_engine.tensorrt_why_not("cuda")
    assert "has no TensorRT execution provider" in why and "onnxruntime-gpu" in why
    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    # TensorRT's libraries: the tensorrt-cu*-libs wheel's folder first, then the system's
    wheel = tmp_path / "tensorrt_libs"
    wheel.mkdir()
    (wheel / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    tried = []

    def cdll(path, mode=0):
        tried.append(path)
        raise OSError(f"{path}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(trt_engine, "torch_cuda", lambda: "12.4")
    why = trt_engine.tensorrt_why_not("cuda")
    assert tried == [str(wheel / "libnvinfer.so.10"), "libnvinfer.so.10"]
    assert why.startswith("TensorRT's libnvinfer.so.10 does not load (libnvinfer.so.10: cannot")
    assert why.endswith("https://pypi.nvidia.com tensorrt-cu12-libs==10.16.1.11 (docs/gpu.md)")
    tried.clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: tried.append((path, mode)))
    assert trt_engine.tensorrt_why_not("cuda") is None
    assert tried == [(str(wheel / s), ctypes.RTLD_GLOBAL) for s in trt_engine.TRT_SONAMES]


def test_the_install_line_follows_torchs_cuda():
    assert trt_engine.tensorrt_install("13.0") == ("pip install --extra-index-url "
        "https://pypi.nvidia.com tensorrt-cu13-libs==10.16.1.11 (docs/gpu.md)")
    assert "tensorrt-cu12-libs" in trt_engine.tensorrt_install("11.8") and \
        "tensorrt-cu13-libs" in trt_engine.tensorrt_install("11.8")
    # the pins are TensorRT 10: both onnxruntime-gpu pins link libnvinfer.so.10
    assert all(p.split("==")[1].startswith("10.") for p in trt_engine.TRT_LIBS_PINS.values())
    assert all(s.endswith(".so.10") for s in trt_engine.TRT_SONAMES)
