"""Inference benchmark on the CPU (issue 6): end-to-end images/s on full-size synthetic test
DICOMs, and peak memory for N vs 4N images (streaming must keep it flat).

    python benchmarks/predict.py [--patients 4] [--models resnet18:256,resnext50_32x4d:512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from rsna_utils.infer.predict import predict
r = predict(sys.argv[2] + "/test_images", sys.argv[2] + "/test.csv", [sys.argv[3]], sys.argv[4],
            workers=int(sys.argv[5]), batch_size=8, device="cpu", progress=False)
self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"images": len(r.images), "seconds": r.seconds, "self_mb": self_mb, "workers_mb": kids_mb}))
"""


def make_checkpoint(model: str, size: int, out: Path) -> Path:
    from rsna_utils.image.preprocess import PreprocessConfig
    from rsna_utils.learn.checkpoint import Checkpoint, InputSpec
    from rsna_utils.learn.models import create_model
    m = create_model(model)
    p = out / f"{model}_{size}.pt"
    Checkpoint(m.state_dict(), model, InputSpec(size),
               preprocess=PreprocessConfig(size=size).to_dict()).save(p)
    return p


def run(data: Path, ckpt: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(data), str(ckpt),
                            f"{d}/sub.csv", str(workers)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    from rsna_utils.sources.synth import synthesize
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=4, help="full-size test patients")
    ap.add_argument("--models", default="resnet18:256,resnext50_32x4d:512")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = tmp / "full"
        synthesize(full, patients=1, test_patients=a.patients, seed=4, size="full", progress=False)
        print(f"# CPU inference benchmark, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
        print("| model @ input | images | img/s (DICOM -> submission) | 32,000 images would take |")
        print("|---|---|---|---|")
        for spec in a.models.split(","):
            name, size = spec.split(":")
            ck = make_checkpoint(name, int(size), tmp)
            r = run(full, ck, a.workers)
            rate = r["images"] / r["seconds"]
            print(f"| {name} @ {size} | {r['images']} | {rate:.2f} | {32000 / rate / 3600:.1f} h |")
        small_n, big_n = tmp / "n", tmp / "n4"
        synthesize(small_n, patients=1, test_patients=10, seed=6, size="small", progress=False)
        synthesize(big_n, patients=1, test_patients=40, seed=6, size="small", progress=False)
        ck = make_checkpoint("resnet18", 256, tmp)
        r1, r4 = run(small_n, ck, a.workers), run(big_n, ck, a.workers)
        print(f"\nPeak RSS, main process: {r1['images']} images {r1['self_mb']:.0f} MiB, "
              f"{r4['images']} images {r4['self_mb']:.0f} MiB ({(r4['self_mb'] / r1['self_mb'] - 1) * 100:+.1f}%); "
              f"largest worker {r1['workers_mb']:.0f} -> {r4['workers_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
