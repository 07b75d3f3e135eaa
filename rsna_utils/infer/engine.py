"""Exported members at inference: `rsna predict --runtime onnx` runs each checkpoint's ONNX
export (`infer.export`, `rsna export --format onnx`) through onnxruntime instead of eager
PyTorch, chosen like the decoders are: probed before it is used, the reason said in one line
when it is not, and the fallback (the member in eager PyTorch) named and taken.

For each member: its contract (DIR/<name>.onnx.json, beside the .onnx) is found by the
checkpoint it was exported from (`find_contract`); a contract whose sha256 differs from the
checkpoint's is refused (re-export), never run. The contract's input is read back into an
`InputSpec` (`contract_input`); one that is not the checkpoint's keeps the member in PyTorch,
and a member that runs exported has its batches made from it, by predict's own code. The
session is built on the execution providers present (CPU here; CUDA on a GPU), then a probe
batch (`probe_batch`, made as predict makes its batches) goes through both the session and
the PyTorch model: the member runs in onnxruntime only when the two agree within the
stated tolerance (`TOLERANCE`), so a model that exports wrongly costs speed, never a score.
`OnnxModel` stands in for the PyTorch model where `predict` calls it (the image models'
forward, the breast models' `features`; a breast model's attention pooling stays in PyTorch).

`--runtime tensorrt` is the same route with onnxruntime's TensorRT provider ahead of its CUDA
one (`infer.trt_engine`: FP16 engines built on the GPU they run on, cached per GPU and version).
Probed like the rest: no GPU, no TensorRT provider, TensorRT's libraries missing, a provider
that does not load, or an engine TensorRT cannot build: one line, and the members run on the
CUDA provider (then as above).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from rsna_utils.core.errors import RsnaError, say_once
from rsna_utils.infer.trt_engine import (TRT_BATCH, TRT_PROVIDER, tensorrt_cache, tensorrt_install,
                                         tensorrt_provider, tensorrt_why_not, torch_cuda)

ORT_PIN = "onnxruntime==1.32.0"         # requirements.txt
# The CUDA provider: onnxruntime-gpu, which replaces onnxruntime (both are the `onnxruntime`
# package: never both installed), per CUDA major of torch. No 1.32.0 GPU wheel exists; 1.31.1's
# links libcudart.so.13, and 1.26.0 is the last built for CUDA 12 (Kaggle's image). Stated in
# requirements-gpu.txt / requirements-gpu-cu12.txt, as an install line (pip -r cannot uninstall).
ORT_GPU_PINS = {"13": "onnxruntime-gpu==1.31.1", "12": "onnxruntime-gpu==1.26.0"}
CONTRACT_SUFFIX = ".onnx.json"
FORMAT = "rsna-onnx-1"
# The largest |probability| difference between the exported member and its PyTorch model on
# the probe batch for the member to run in onnxruntime: float32 on both sides (the CPU) agree
# to about 1e-6; against the autocast (fp16 / bf16) PyTorch path of a GPU to about 1e-3.
TOLERANCE = {"fp32": 1e-4, "half": 2e-2}
GPU_PROVIDERS = ("CUDAExecutionProvider",)
FALLBACK = "eager PyTorch"
EXPORTED_RUNTIMES = ("onnx", "tensorrt")       # the runtimes that run `rsna export`'s models
RUNTIMES = ("torch",) + EXPORTED_RUNTIMES     # PredictConfig.runtime


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def providers(device_type: str) -> tuple[list[str] | None, str]:
    """(execution providers to ask onnxruntime for, "") on this device, or (None, why not):
    onnxruntime missing, or on a GPU no CUDA provider (the CPU provider would leave the GPU idle
    and run hours slower than eager PyTorch on it)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime is not installed ({e}; pip install {ORT_PIN})"
    have = ort.get_available_providers()
    if device_type == "cuda":
        gpu = [p for p in GPU_PROVIDERS if p in have]
        if not gpu:
            return None, (f"onnxruntime {ort.__version__} has no CUDA execution provider here "
                          f"(it has {', '.join(have)}; for the GPU: {gpu_install()})")
        return gpu + ["CPUExecutionProvider"], ""
    if "CPUExecutionProvider" not in have:
        return None, f"onnxruntime {ort.__version__} has no CPU execution provider"
    return ["CPUExecutionProvider"], ""


def gpu_install(cuda: str | None = None) -> str:
    """The line that swaps onnxruntime for onnxruntime-gpu built for `cuda` (default: the
    CUDA torch was built for), docs/gpu.md's route."""
    cuda = torch_cuda() if cuda is None else cuda
    pin = ORT_GPU_PINS.get(str(cuda).split(".")[0])
    if pin is None:
        return ("pip uninstall -y onnxruntime, then pip install " + " or ".join(
            f"{p} (CUDA {k})" for k, p in ORT_GPU_PINS.items()) + "; docs/gpu.md")
    return f"pip uninstall -y onnxruntime && pip install {pin} (docs/gpu.md)"


def read_contract(path: str | Path) -> dict:
    path = Path(path)
    try:
        c = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RsnaError(f"{path}: not a readable contract ({type(e).__name__}: {e}); re-export: "
                        "rsna export --format onnx --checkpoints CKPT --out DIR") from None
    if not isinstance(c, dict) or c.get("format") != FORMAT:
        raise RsnaError(f"{path}: not a contract of `rsna export --format onnx` (format "
                        f"{c.get('format') if isinstance(c, dict) else None!r}, want {FORMAT!r}); "
                        "re-export with this version")
    c["_path"] = str(path)
    return c


def contract_input(c: dict):
    """The contract's `InputSpec` (what the export reads), as a checkpoint's is read: written
    by `InputSpec.to_dict`, or in the first contracts' spelling (norm {"mean", "std"})."""
    from rsna_utils.learn.checkpoint import InputSpec
    try:
        return InputSpec.from_checkpoint(c)
    except (KeyError, TypeError, ValueError, RsnaError) as e:
        raise RsnaError(f"{c.get('_path', 'contract')}: its input (size, channels, norm, resize, "
                        f"level) does not read ({type(e).__name__}: {e}); re-export: rsna export "
                        "--format onnx --checkpoints CKPT --out DIR") from None


def find_contract(checkpoint: str | Path, folder: str | Path | None = None) -> dict | None:
    """The contract exported from `checkpoint` in `folder` (default: the checkpoint's own): the
    one whose recorded checkpoint path resolves to it, else one named as an export of it would
    be (`member_name`: the folders moved together); None when there is none."""
    ck = Path(checkpoint)
    folder = Path(folder) if folder is not None else ck.parent
    here = os.path.normpath(os.path.abspath(ck))
    contracts = sorted(folder.glob("*" + CONTRACT_SUFFIX)) if folder.is_dir() else []
    for p in contracts:
        c = read_contract(p)
        there = os.path.normpath(os.path.abspath(folder / str(c.get("checkpoint", ""))))
        if there == here:
            return c
    for name in dict.fromkeys([member_name(ck), ck.stem]):
        p = folder / (name + CONTRACT_SUFFIX)
        if p.is_file():
            return read_contract(p)
    return None


def engines_folder(ensemble: str | Path) -> str:
    """Where `--runtime onnx` looks for the exports of an ensemble given without --engines: its
    own folder (`rsna export` writes the .onnx files beside its ensemble.json); ".." resolved
    by the text, as `Ensemble.read` does."""
    ens = Path(os.path.normpath(os.path.abspath(ensemble)))
    return str(ens if ens.is_dir() else ens.parent)


def member_name(checkpoint: str | Path) -> str:
    """The export's name of a checkpoint: its run folder and file stem (runs/r18/fold0/best.pt
    -> fold0_best), as the Kaggle export names its copies."""
    ck = Path(checkpoint)
    return f"{ck.parent.name}_{ck.stem}" if ck.parent.name else ck.stem


def check_contract(c: dict, checkpoint: str | Path) -> Path | None:
    """The .onnx of contract `c` for `checkpoint`, or None when the export failed (the contract
    says why). Refused (RsnaError) when it was exported from another file than the checkpoint
    or its .onnx was replaced since: its scores would not be the checkpoint's."""
    where = c["_path"]
    fix = (f"re-export: rsna export --format onnx --checkpoints {checkpoint} --out "
           f"{Path(where).parent}")
    have = sha256(checkpoint)
    if c.get("checkpoint_sha256") != have:
        raise RsnaError(f"{where}: exported from another checkpoint than {checkpoint} (sha256 "
                        f"{str(c.get('checkpoint_sha256'))[:12]}, the file has {have[:12]}); {fix}")
    if not c.get("onnx"):
        return None
    onnx = Path(where).parent / c["onnx"]
    if not onnx.is_file():
        raise RsnaError(f"{onnx}: missing (its contract {where} names it); {fix}")
    if c.get("onnx_sha256") and sha256(onnx) != c["onnx_sha256"]:
        raise RsnaError(f"{onnx}: changed since it was exported (sha256 differs from its "
                        f"contract {where}); {fix}")
    return onnx


def make_session(onnx: str | Path, provider_list: list[str], threads: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3            # errors only: the fallback line says the rest
    return ort.InferenceSession(str(onnx), so, providers=provider_list)


class OnnxModel:
    """An exported member in the PyTorch model's place: called on a (N, C, H, W) tensor it
    returns the model's output (the image graph's logits), `features` returns a breast model's
    per-view features (the breast graph); anything else (a breast model's `pool`, `eval`) is
    the PyTorch model's. Tensors come back on the input's device."""

    def __init__(self, session, torch_model, graph: str, max_batch: int | None = None):
        """`max_batch`: the largest batch the session takes (a TensorRT engine's profile);
        larger ones are run in parts."""
        self.session, self.torch_model, self.graph = session, torch_model, graph
        self.max_batch = max_batch
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name
        self.providers = session.get_providers()

    def run(self, x):
        import numpy as np
        import torch
        if self.max_batch and x.shape[0] > self.max_batch:
            return torch.cat([self.run(part) for part in x.split(self.max_batch)])
        if x.is_cuda and "CUDAExecutionProvider" in self.providers:
            return self._run_cuda(x)
        a = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run([self.output], {self.input: a})[0]
        return torch.from_numpy(out).to(x.device)

    def _run_cuda(self, x):
        """Input and output stay on the GPU (IO binding: no copy through the host)."""
        import numpy as np
        import torch
        x = x.detach().float().contiguous()
        io = self.session.io_binding()
        io.bind_input(self.input, "cuda", x.device.index or 0, np.float32, tuple(x.shape),
                      x.data_ptr())
        io.bind_output(self.output, "cuda", x.device.index or 0)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()[0]
        return torch.from_dlpack(out.to_dlpack()) if hasattr(out, "to_dlpack") else \
            torch.from_numpy(out.numpy()).to(x.device)

    def __call__(self, x):
        if self.graph != "logits":
            raise RsnaError(f"this export holds the {self.graph} graph, not the model's forward")
        return self.run(x)

    def features(self, x):
        if self.graph != "features":
            raise RsnaError(f"this export holds the {self.graph} graph, not a breast model's "
                            "features")
        return self.run(x)

    def __getattr__(self, name):
        if name in ("session", "torch_model", "graph"):
            raise AttributeError(name)
        return getattr(self.torch_model, name)


def probe_batch(spec, device, batch: int = 2):
    """A batch made as `predict` makes its batches (`data.raw_batch`, then
    `data.device_input`) for the input `spec`, from random 8-bit images of 1.5 times its
    height (resized and padded on the way)."""
    import numpy as np

    from rsna_utils.learn.data import device_input, raw_batch
    h, w = spec.size
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h + h // 2, w), dtype=np.uint8) for _ in range(batch)]
    return device_input(raw_batch(imgs, spec.size).to(device), None, spec.norm, spec.channels,
                        channels_last=True)


def probe_difference(model, engine: OnnxModel, contract: dict, device, batch: int = 2) -> float:
    """The largest |difference| between the PyTorch model and its export on a random batch
    made for the contract's input (`probe_batch`), as `predict` would score it: the cancer
    probability for an image model; for a breast model its features' pooled probability,
    each view alone."""
    import torch

    from rsna_utils.learn.checkpoint import cancer_logit
    from rsna_utils.learn.device import half_dtype
    x = probe_batch(contract_input(contract), device, batch)
    dtype = half_dtype(device)
    with torch.inference_mode():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if contract["graph"] == "features":
                ref, got = model.features(x).float(), engine.features(x).float()
                mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
                ref = torch.sigmoid(cancer_logit(model.pool(ref[:, None], mask)[0]))
                got = torch.sigmoid(cancer_logit(model.pool(got[:, None], mask)[0]))
            else:
                ref = torch.sigmoid(cancer_logit(model(x)))
                got = torch.sigmoid(cancer_logit(engine(x)))
    return float((ref.float() - got.float()).abs().max())


def attach_engines(models: list, device, folder: str | Path | None = None,
                   say=None, tensorrt: bool = False) -> list[str]:
    """Put each member's exported model (`OnnxModel`) in its PyTorch model's place where it is
    usable; the others stay in eager PyTorch, each with one line saying why. Returns the
    runtime of each member ("onnx" or "torch"). `tensorrt`: onnxruntime's TensorRT provider
    first (FP16 engines, `tensorrt_cache`) where it loads, else one line and the CUDA provider.
    Refuses (RsnaError) a contract exported from another checkpoint."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    device = _device(device)
    label = "runtime tensorrt" if tensorrt else "runtime onnx"
    plist, why = providers(device.type)
    if plist is None:
        say_once(f"{label}: {why}; running every member in {FALLBACK}")
        return ["torch"] * len(models)
    cache = None
    if tensorrt:
        trt_why = tensorrt_why_not(device.type)
        if trt_why is None and models:
            cache = tensorrt_cache(folder if folder is not None else Path(models[0].path).parent,
                                   device)
            built = cache.is_dir() and any(cache.glob("*.engine"))
            say(f"{label}: " + (f"TensorRT engines of this GPU and version in {cache}" if built
                                else f"TensorRT builds each member's engine as it loads (minutes "
                                     f"each, once for this GPU and version: kept in {cache})"))
        else:
            say_once(f"{label}: {trt_why}; the members run through onnxruntime's "
                     f"{'CUDA' if device.type == 'cuda' else 'CPU'} provider where they can")
    contracts = []
    for m in models:       # every contract checked before any session is built
        c = find_contract(m.path, folder)
        contracts.append((c, None if c is None else check_contract(c, m.path)))
    tol = TOLERANCE["half" if device.type == "cuda" else "fp32"]
    runtimes, worst, used, lost = [], 0.0, set(), None
    for i, (m, (c, onnx)) in enumerate(zip(models, contracts)):
        if lost:                   # the provider loads per process: said once, for the rest
            runtimes.append("torch")
            continue
        where = Path(folder) if folder is not None else Path(m.path).parent
        reason = None
        if c is None:
            reason = (f"no export of it in {where} (rsna export --format onnx --checkpoints "
                      f"{m.path} --out {where})")
        elif onnx is None:
            reason = f"it did not export to ONNX ({c.get('error', 'no .onnx written')})"
        elif (spec := contract_input(c)) != m.spec:
            reason = (f"its contract's input ({_said(spec)}) is not its checkpoint's "
                      f"({_said(m.spec)}); re-export it: rsna export --format onnx "
                      f"--checkpoints {m.path} --out {where}")
        else:
            try:
                trt = [tensorrt_provider(c, spec, device, cache)] if cache else []
                try:
                    session = make_session(onnx, trt + plist)
                except Exception as e:    # noqa: BLE001 - TensorRT refused it: the CUDA provider
                    if not trt:
                        raise
                    say(f"{m.path}: TensorRT could not build {onnx.name} ({type(e).__name__}: "
                        f"{_first_line(e)}); it runs on onnxruntime's CUDA provider")
                    trt, session = [], make_session(onnx, plist)
                engine = OnnxModel(session, m.model, c["graph"],
                                   max_batch=TRT_BATCH if trt else None)
                if trt and TRT_PROVIDER not in engine.providers:   # listed, did not load
                    say(f"{label}: onnxruntime lists its TensorRT provider but could not load "
                        f"it (the session runs on {', '.join(engine.providers)}); the members "
                        f"run on the CUDA provider; TensorRT 10 for this torch: "
                        f"{tensorrt_install()}")
                    cache = None                          # said once: the rest as onnx
                lost = gpu_provider_lost(engine.providers, device)
                diff = probe_difference(m.model, engine, c, device) if lost is None else None
            except Exception as e:            # noqa: BLE001 - any failure: that member in torch
                reason = (f"onnxruntime cannot run {onnx.name} ({type(e).__name__}: "
                          f"{_first_line(e)})")
            else:
                if lost:
                    rest = "every member" if i == 0 else f"{m.path} and the members after it"
                    say(f"{label}: {lost}; {rest} in {FALLBACK}")
                    runtimes.append("torch")
                    continue
                if not diff <= tol:
                    reason = (f"its export scores differ from PyTorch on the probe batch (max "
                              f"|dp| {diff:.2e} > {tol:g}); re-export it, or keep it in torch")
        if reason:
            say(f"{m.path}: runs in {FALLBACK}, not onnxruntime: {reason}")
            runtimes.append("torch")
            continue
        m.model = engine
        m.use_input(spec)         # its batches made from the contract's InputSpec
        worst = max(worst, diff)
        used.update(p for p in engine.providers if p != "CPUExecutionProvider" or
                    device.type != "cuda")
        runtimes.append("onnx")
    n = runtimes.count("onnx")
    if n:
        import onnxruntime as ort
        say(f"{label}: {n} of {len(models)} member(s) through onnxruntime {ort.__version__} "
            f"({', '.join(sorted(used))}); probe max |dp| against PyTorch {worst:.1e} (allowed "
            f"{tol:g})" + (f"; {len(models) - n} in {FALLBACK} (named above)"
                           if n < len(models) else ""))
    return runtimes


def gpu_provider_lost(session_providers: list[str], device) -> str | None:
    """Why a session built for the GPU would not run on it, or None. onnxruntime-gpu lists its
    CUDA provider whether or not the provider's libraries load; when they do not (a CUDA or
    cuDNN other than the wheel's: a cu12 wheel beside CUDA 13, or no GPU), the session is built
    on the CPU provider alone with a log line and no error, and would score hours slower than
    eager PyTorch on the GPU. Caught here, from what the session says it runs on."""
    if _device(device).type != "cuda" or any(p in session_providers for p in GPU_PROVIDERS):
        return None
    import onnxruntime as ort
    return (f"onnxruntime {ort.__version__} lists its CUDA provider but could not load it (the "
            f"session runs on {', '.join(session_providers) or 'nothing'}: its CUDA or cuDNN "
            f"libraries are not the ones it was built for, or no GPU is visible); the wheel for "
            f"this torch: {gpu_install()}")


def _said(spec) -> str:
    """An InputSpec in a few words, for a line."""
    d = spec.to_dict()
    return (f"{d['size'][0]}x{d['size'][1]}x{d['channels']}, {d['level']}, mean "
            f"{[round(v, 4) for v in d['norm'][0]]}, std {[round(v, 4) for v in d['norm'][1]]}, "
            f"resize {d['resize']}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else ""


def _device(device):
    import torch
    return device if isinstance(device, torch.device) else torch.device(device)
