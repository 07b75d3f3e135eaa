"""Exported engine against eager PyTorch on the CPU (issue 41): per backbone family, the same
checkpoint (random weights, nothing downloaded) and the same input batches scored by eager
PyTorch (as `rsna predict` runs it: inference mode, channels-last input) and by its ONNX export
through onnxruntime (as `rsna predict --runtime onnx` runs it: `engine.attach_engines`, the
probe, `OnnxModel`), alternating in one run: each round times one pass of each, in alternating
order, so a load from other jobs falls on both. Reported: img/s of each (median over the rounds),
the ratio onnxruntime / PyTorch (median of the per-round ratios, with its range) and the largest
|difference| of the cancer probability (for a breast model: of its one-view pooled probability).

    python benchmarks/onnx_bench.py [--size 256x128] [--batch 8] [--rounds 5] [--threads 2]
        [--models resnet18,resnext50_32x4d,tf_efficientnet_lite0,efficientnet_b2,
                  convnext_small,breast:resnet18] [--device cuda] [--runtime tensorrt]

On a GPU (`--device cuda`, for issue 42's table) PyTorch runs as predict runs it there (autocast
fp16/bf16) and onnxruntime on its CUDA provider (`--runtime onnx`) or TensorRT FP16 first
(`--runtime tensorrt`); a member that falls back is named and the run stops for it.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ("resnet18,resnext50_32x4d,tf_efficientnet_lite0,efficientnet_b2,"
                  "convnext_small,breast:resnet18")


def _timed(fn, x) -> tuple[float, object]:
    import torch
    t = time.perf_counter()
    out = fn(x)                       # numpy on the host: the device has finished
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t, out


def bench_one(spec: str, size, batch: int, rounds: int, threads: int, root: Path,
              device: str = "cpu", runtime: str = "onnx") -> dict:
    import numpy as np
    import torch

    from rsna_utils.infer import engine
    from rsna_utils.infer.export import ExportConfig, export_onnx, random_checkpoint
    from rsna_utils.infer.scoring import load_models
    from rsna_utils.learn.checkpoint import cancer_probability
    from rsna_utils.learn.device import half_dtype
    level, _, name = spec.rpartition(":")
    level = level or "image"
    pool = "max" if name.startswith("convnext") else "gem"
    ck = random_checkpoint(root / spec.replace(":", "_") / "best.pt", name, size, level, pool)
    t = time.perf_counter()
    export_onnx(ExportConfig(out=str(root / "onnx"), checkpoints=[str(ck)]),
                progress=lambda s: None)
    export_s = time.perf_counter() - t
    dev = torch.device(device)
    (ref,), _ = load_models([ck], dev)
    (exp,), _ = load_models([ck], dev)
    orig, said = engine.make_session, []
    if dev.type == "cpu":                                                        # same cores
        engine.make_session = lambda p, pl, threads_=threads: orig(p, pl, threads_)
    try:
        ran = engine.attach_engines([exp], dev, root / "onnx", say=said.append,
                                    tensorrt=runtime == "tensorrt")
    finally:
        engine.make_session = orig
    if ran != ["onnx"]:
        raise SystemExit(f"{spec}: did not run through onnxruntime: " + " | ".join(said))
    half = half_dtype(dev)

    def score(m):
        def run(x):
            with torch.inference_mode(), torch.autocast(dev.type, dtype=half,
                                                        enabled=half is not None):
                if m.level == "breast":
                    f = m.model.features(x).float()
                    mask = torch.ones(len(x), 1, dtype=torch.bool, device=dev)
                    out, _ = m.model.pool(f[:, None], mask)
                    return torch.sigmoid(out[:, 0].float()).cpu().numpy()
                return cancer_probability(m.model, x).float().cpu().numpy()
        return run
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, *size, generator=g).to(dev).contiguous(
          memory_format=torch.channels_last) for _ in range(rounds + 1)]
    runs = {"torch": score(ref), "onnx": score(exp)}
    for k in runs:                                     # warm-up (first-call allocations)
        runs[k](xs[0])
    secs = {"torch": [], "onnx": []}
    diff = 0.0
    for r, x in enumerate(xs[1:]):
        order = ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")
        outs = {}
        for k in order:
            s, outs[k] = _timed(runs[k], x)
            secs[k].append(s)
        diff = max(diff, float(np.abs(outs["torch"] - outs["onnx"]).max()))
    ratios = [a / b for a, b in zip(secs["torch"], secs["onnx"])]     # onnx img/s / torch img/s
    return {"model": name, "level": level, "size": size, "batch": batch, "export_s": export_s,
            "torch_ips": batch / statistics.median(secs["torch"]),
            "onnx_ips": batch / statistics.median(secs["onnx"]),
            "ratio": statistics.median(ratios), "ratio_lo": min(ratios), "ratio_hi": max(ratios),
            "max_dp": diff, "providers": getattr(exp.model, "providers", [])}


def table(rows: list[dict], rounds: int) -> str:
    out = ["| backbone | level | input | batch | eager PyTorch img/s | onnxruntime img/s | "
           f"ratio (median, range of {rounds} rounds) | max abs diff of p | export s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['level']} | {r['size'][0]}x{r['size'][1]} | "
                   f"{r['batch']} | "
                   f"{r['torch_ips']:.1f} | {r['onnx_ips']:.1f} | **{r['ratio']:.2f}x** "
                   f"({r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}) | {r['max_dp']:.1e} | "
                   f"{r['export_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="comma-separated timm names; breast:NAME for a breast-level model")
    ap.add_argument("--size", default="256x128", help="model input HxW (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads for both (default: 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--runtime", default="onnx", choices=("onnx", "tensorrt"),
                    help="onnx: the CPU or CUDA provider; tensorrt: TensorRT FP16 first")
    a = ap.parse_args()
    import onnxruntime
    import torch
    torch.set_num_threads(a.threads)
    size = tuple(int(v) for v in a.size.lower().split("x"))
    size = size * 2 if len(size) == 1 else size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.models.split(","):
            r = bench_one(spec.strip(), size, a.batch, a.rounds, a.threads, Path(tmp), a.device,
                          a.runtime)
            print(f"{spec}: torch {r['torch_ips']:.1f} img/s, onnxruntime {r['onnx_ips']:.1f} "
                  f"img/s, ratio {r['ratio']:.2f}, max |dp| {r['max_dp']:.1e}", file=sys.stderr,
                  flush=True)
            rows.append(r)
    where = (torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda")
             else f"{a.threads} threads each, {platform.machine()}")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} "
          f"({', '.join(rows[0]['providers']) if rows else '?'}), runtime {a.runtime}, {where}")
    print(table(rows, a.rounds))


if __name__ == "__main__":
    main()
