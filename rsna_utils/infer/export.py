"""`rsna export --format onnx`: each checkpoint of an ensemble as an ONNX model with its input
contract beside it, and the ensemble's ensemble.json naming them.

DIR/<name>.onnx holds the graph `predict` calls (a dynamic batch axis, the input's height and
width fixed at the trained size): for an image-level model its forward, (N, C, H, W) ->
(N, 1 + aux) logits; for a breast-level model its per-view `features`, (N, C, H, W) -> (N, F)
(the attention pooling over a breast's views stays in PyTorch, read from the checkpoint).
DIR/<name>.onnx.json is its contract: the checkpoint's `InputSpec` as the checkpoint spells it
(size [h, w], channels, norm [mean, std], the PNG -> input resize rule, level; `predict --runtime
onnx` reads it back into an InputSpec), the model name, threshold and prior, the graph, the
opset, the sha256 of the source checkpoint and of the .onnx, and the largest difference from
PyTorch measured at export. A model that does not export (an unsupported layer) gets a
contract saying why and no .onnx: `rsna predict --runtime onnx` runs it in eager PyTorch.
DIR/ensemble.json: the source ensemble's keys (or a bare one for --checkpoints), its
checkpoints relative to DIR, and "engines", the .onnx of each (null where none exported).
The runtime side is `infer.engine`.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from rsna_utils.core.config import Config, setting
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.infer.engine import (CONTRACT_SUFFIX, FORMAT, TOLERANCE, member_name,
                                     providers, sha256)
from rsna_utils.infer.ensemble import ENSEMBLE_FILE, Ensemble, unique_names

OPSET = 17          # onnxruntime 1.16 and later run it; the legacy exporter's well-trodden opset


@dataclass
class ExportConfig(Config):
    """`rsna export` flags: the members (checkpoints, or an ensemble.json that lists them or
    the runs it merged) and where their exports go."""

    KIND = "export"

    out: str = setting(help="output folder: <name>.onnx, <name>.onnx.json per member, "
                       "ensemble.json")
    format: str = setting("onnx", "the export's format", choices=("onnx",))
    checkpoints: list | None = setting(None, "best.pt files of `rsna train` (or give --ensemble)")
    ensemble: str | None = setting(None, "ensemble.json of `rsna oof` or an export: its members "
                                   "(its checkpoints, else its runs' best.pt) and its settings")
    opset: int = setting(OPSET, "ONNX opset", ge=13, le=21)
    check: bool = setting(True, "run every export through onnxruntime against PyTorch on a "
                          "random batch and store the difference", negate="--no-check")

    def __post_init__(self):
        if isinstance(self.checkpoints, (str, os.PathLike)):
            self.checkpoints = [self.checkpoints]
        self.check_fields()
        if bool(self.checkpoints) == bool(self.ensemble):
            raise RsnaError("rsna export: give the members either as --checkpoints A.pt B.pt or as "
                            "--ensemble ensemble.json (one of the two)")
        if self.checkpoints:
            self.checkpoints = [os.fspath(c) for c in self.checkpoints]

    def run(self) -> dict:
        return export_onnx(self)


def ensemble_members(path: str | Path) -> tuple[Ensemble, list[str]]:
    """An ensemble.json and its members: an export's checkpoints (beside it), else the best.pt
    of each run `rsna oof` merged."""
    ens = Ensemble.read(path, checkpoints=False) if _has_threshold(path) else None
    if ens is None or ens.get("checkpoints"):
        ens = Ensemble.read(path, checkpoints=True)
        return ens, list(ens["checkpoints"])
    runs = [r["run"] for r in ens.get("runs") or [] if isinstance(r, dict) and r.get("run")]
    ckpts = [str(Path(r) / "best.pt") for r in runs]
    missing = [c for c in ckpts if not Path(c).is_file()]
    if not ckpts or missing:
        raise RsnaError(f"{path}: lists no checkpoints, and the best.pt of its runs "
                        f"{missing or '(none listed)'} not found; pass --checkpoints")
    return ens, ckpts


def _has_threshold(path) -> bool:
    p = Path(path)
    p = p / ENSEMBLE_FILE if p.is_dir() else p
    try:
        return json.loads(p.read_text()).get("threshold") is not None
    except (OSError, ValueError, AttributeError):
        return False


def export_onnx(cfg: ExportConfig, progress=None) -> dict:
    """Export every member (`export_member`), then DIR/ensemble.json. Returns {"members":
    [contract...], "ensemble": path, "line": what was written}."""
    import torch

    from rsna_utils.infer.scoring import load_models
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    if cfg.ensemble:
        ens, ckpts = ensemble_members(cfg.ensemble)
    else:
        ens, ckpts = Ensemble({"threshold": None, "binarize": None, "agg": "mean"}), cfg.checkpoints
    out = Path(cfg.out)
    _check_out(out, cfg.ensemble)
    out.mkdir(parents=True, exist_ok=True)
    models, _ = load_models(ckpts, torch.device("cpu"))
    names = member_names(ckpts)
    contracts = []
    for m, name in zip(models, names):
        c = export_member(m, out, name, opset=cfg.opset, check=cfg.check)
        say(c["line"])
        contracts.append(c)
    keep = Ensemble({k: v for k, v in ens.items() if k not in ("line", "oof_csv")})
    keep["checkpoints"] = [os.path.relpath(os.path.abspath(c), os.path.abspath(out)) for c in ckpts]
    keep["recipes"] = [m.recipe for m in models]
    keep["engines"] = [c["onnx"] for c in contracts]
    keep["engine_format"] = FORMAT
    keep.write(out / ENSEMBLE_FILE)
    done = sum(1 for c in contracts if c["onnx"])
    line = (f"exported {done} of {len(contracts)} member(s) as ONNX (opset {cfg.opset}) to {out}"
            + (f"; {len(contracts) - done} did not export (named above): `rsna predict --runtime "
               "onnx` runs those in eager PyTorch" if done < len(contracts) else "")
            + f"; predict with --runtime onnx --engines {out}")
    return {"members": contracts, "ensemble": str(out / ENSEMBLE_FILE), "line": line}


def _check_out(out: Path, source: str | None) -> None:
    """An ensemble.json already in `out` is replaced only when it is the one exported (in
    place: the export adds its engines) or an earlier export's; another is refused."""
    there = out / ENSEMBLE_FILE
    if not there.is_file():
        return
    if source is not None:
        src = Path(source)
        src = src / ENSEMBLE_FILE if src.is_dir() else src
        if os.path.samefile(src, there):
            return
    try:
        earlier = "engines" in json.loads(there.read_text())
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise RsnaError(f"{there}: an ensemble.json that is not an earlier `rsna export`; give "
                        f"another --out, or --ensemble {there} to export that ensemble in place")


def member_names(ckpts) -> list[str]:
    """`member_name` of each checkpoint, made unique (a counter) within the export."""
    return unique_names([member_name(c) for c in ckpts])


def features_module(model):
    """A breast model's `features` as a module's forward (the graph its export holds)."""
    import torch

    class Features(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.features(x)
    return Features(model)


def export_member(m, out: Path, name: str, opset: int = OPSET, check: bool = True) -> dict:
    """DIR/<name>.onnx and DIR/<name>.onnx.json for the loaded member `m` (a
    `checkpoint.LoadedModel` on the CPU); the contract (with "line", what happened). A model
    the exporter cannot take: a contract with "error" and no .onnx, nothing raised."""
    import torch
    graph = "features" if m.level == "breast" else "logits"
    module = features_module(m.model) if graph == "features" else m.model
    module.eval()
    spec = m.spec                     # the checkpoint's InputSpec, written as it spells it
    h, w = spec.size
    x = torch.randn(2, spec.channels, h, w, generator=torch.Generator().manual_seed(0))
    onnx_path, contract_path = out / f"{name}.onnx", out / f"{name}{CONTRACT_SUFFIX}"
    contract = {"format": FORMAT, "name": name, "onnx": None, "graph": graph,
                "checkpoint": os.path.relpath(os.path.abspath(m.path), os.path.abspath(out)),
                "checkpoint_sha256": sha256(m.path), "model_name": m.name,
                **spec.to_dict(), "threshold": m.threshold, "prior": m.prior,
                "recipe": m.recipe, "opset": opset, "input": "input",
                "output": graph, "dynamic_axes": {"input": [0], graph: [0]},
                "torch": torch.__version__}
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
    try:
        with _quiet_exporter(), torch.no_grad():
            _export(module, x, tmp, graph, opset)
        os.replace(tmp, onnx_path)
    except Exception as e:            # noqa: BLE001 - an unsupported layer, whatever it raises
        tmp.unlink(missing_ok=True)
        onnx_path.unlink(missing_ok=True)          # an older export of it must not stay
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        contract["error"] = f"{type(e).__name__}: {why}"
        contract["line"] = (f"{m.path}: does not export to ONNX ({contract['error']}); wrote "
                            f"{contract_path.name} without a model: `rsna predict --runtime "
                            "onnx` runs it in eager PyTorch")
        _write_contract(contract_path, contract)
        return contract
    contract["onnx"] = onnx_path.name
    contract["onnx_sha256"] = sha256(onnx_path)
    contract["onnx_bytes"] = onnx_path.stat().st_size
    what = ""
    if check:
        diff = check_export(m, module, onnx_path, x, graph)
        contract["export_check"] = diff
        if diff is not None:
            what = f"; onnxruntime vs PyTorch on a random batch: max |d| {diff:.1e}"
            if diff > TOLERANCE["fp32"]:
                what += f" (over {TOLERANCE['fp32']:g}: predict will keep it in eager PyTorch)"
    contract["line"] = (f"{m.path} -> {onnx_path} ({contract['onnx_bytes'] / 1e6:.1f} MB, "
                        f"{graph} graph, {h}x{w}x{spec.channels}){what}")
    _write_contract(contract_path, contract)
    return contract


def _export(module, x, path: Path, graph: str, opset: int) -> None:
    """torch.onnx.export with a dynamic batch axis. The TorchScript-based exporter (no
    onnxscript needed); where this torch no longer has it, the torch.export-based one."""
    import torch
    kw = dict(input_names=["input"], output_names=[graph], opset_version=opset,
              do_constant_folding=True)
    try:
        torch.onnx.export(module, (x,), str(path), dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, graph: {0: "batch"}}, **kw)
    except TypeError as e:
        if "dynamo" not in str(e):
            raise
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(module, (x,), str(path), dynamic_shapes=({0: batch},),
                          external_data=False, **kw)


def check_export(m, module, onnx_path: Path, x, graph: str) -> float | None:
    """max |difference| of the export's output from PyTorch's (logits or features) on `x`
    through onnxruntime's CPU provider; None without onnxruntime."""
    import numpy as np
    import torch

    from rsna_utils.infer.engine import make_session
    if providers("cpu")[0] is None:
        return None
    s = make_session(onnx_path, ["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(x).float().numpy()
    got = s.run(None, {"input": x.numpy()})[0]
    return float(np.abs(ref - got).max())


def _write_contract(path: Path, contract: dict) -> None:
    write_atomic(path, json.dumps({k: v for k, v in contract.items() if k != "line"}, indent=2)
                 + "\n")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's deprecation and tracer warnings are about its own future, not the
    model, and on a failure it prints the whole traced graph to the process's stdout: neither
    shown (the failure still raises, and is said in one line)."""
    import tempfile
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryFile() as sink:
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def random_checkpoint(path: str | Path, model: str = "resnet18", size=(64, 32),
                      level: str = "image", global_pool: str = "gem", seed: int = 0,
                      preprocess_size=(128, 64)) -> Path:
    """A checkpoint in `rsna train`'s format with random weights (nothing downloaded): what the
    export's tests and benchmark run every backbone family on."""
    import torch

    from rsna_utils.image.convert import PreprocessConfig
    from rsna_utils.learn.checkpoint import Checkpoint, InputSpec
    from rsna_utils.learn.models import create_model, input_norm
    torch.manual_seed(seed)
    if level == "breast":
        from rsna_utils.learn.breast import create_breast_model
        net = create_breast_model(model, 3, global_pool=global_pool, legacy_pool=True)
    else:
        net = create_model(model, 3, global_pool=global_pool, legacy_pool=True)
    net.eval()
    with torch.no_grad():      # a head whose logits spread (about +-2) over random inputs
        x = torch.randn(8, 3, *size)
        f = net.features(x) if level == "breast" else \
            net.forward_head(net.forward_features(x), pre_logits=True)
        head = net.head if level == "breast" else net.get_classifier()
        mu = f.mean(0)
        sd = float((f - mu).std().clamp_min(1e-6))
        head.weight.copy_(torch.randn_like(head.weight) * 2 / (f.shape[1] ** 0.5 * sd))
        head.bias.copy_(-(head.weight * mu).sum(1))
    mean, std = input_norm(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Checkpoint(net.state_dict(), model, InputSpec(size, 3, (mean, std), level=level),
               preprocess=PreprocessConfig(size=tuple(preprocess_size)).to_dict(),
               global_pool=global_pool,
               config={"model": model, "level": level, "size": list(size), "seed": seed}
               ).save(path)
    return path
