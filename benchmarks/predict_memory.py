"""Peak memory of `predict` with a breast-level member against the number of test images
(issue 41): before (every view's features held until the end, then concatenated, made float32 and pooled:
the code of `scoring.add_breast_members`, replayed by the class `Before` below) and
after (each breast pooled as soon as its views are read), on a growing synthetic test set.

    python benchmarks/predict_memory.py [--patients 50,100,200] [--model resnet50] [--size 64x32]

One synthetic set (`rsna synth`, small images) with the largest number of test patients; the
smaller test sets are its first patients. The checkpoint: a breast-level model on `--model`,
randomly initialised (attention weights drawn wide, so the pooling is not uniform) and saved
through `learn.checkpoint.Checkpoint` as training saves one. Each (test set, mode) runs in a
fresh process, the modes alternating: `tracemalloc`'s peak above what was allocated before
`predict` (numpy's arrays are traced: the features are numpy), the process's peak RSS, and the
most views' features the pooling held at once. The two modes' submissions and per-image
predictions must be equal bit for bit (else the script fails).
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

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
import numpy as np
from rsna_utils.infer.predict import predict
from rsna_utils.learn.breast import BreastStream
data, csv, ckpt, mode, out, chunk = sys.argv[2:8]
import rsna_utils.infer.predict as P
import rsna_utils.learn.breast as B
B.POOL_CHUNK = int(chunk)


class Before(BreastStream):
    # the code before issue 41 (scoring.add_breast_members): every batch's features kept, then
    # concatenated, made float32 and pooled by breast_scores at the end; the same values
    def add(self, rows, feats, readable):
        self.kept = getattr(self, "kept", []) + [feats]
        self.read = getattr(self, "read", []) + list(readable)
        self.peak_held = sum(len(f) for f in self.kept)

    def finish(self):
        f = np.concatenate(self.kept).astype(np.float32)
        readable = np.array(self.read, bool)
        got = [B.breast_scores(self.model, f[:, k], readable, self.pid, self.device, B.POOL_CHUNK)
               for k in range(f.shape[1])]
        return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])


if mode == "before":
    B.BreastStream = Before
score_images = P.score_images
scoring = {}
def traced(*a, **k):          # the peak while the images are scored, above what was there
    tracemalloc.reset_peak()
    scoring["base"] = tracemalloc.get_traced_memory()[0]
    out = score_images(*a, **k)
    scoring["peak"] = tracemalloc.get_traced_memory()[1] - scoring["base"]
    return out
P.score_images = traced
held = []
finish = B.BreastStream.finish
def record(self):
    held.append(self.peak_held)
    return finish(self)
B.BreastStream.finish = record
import torch
torch.set_num_threads(1)
tracemalloc.start()
t0 = time.perf_counter()
r = predict(data + "/test_images", csv, [ckpt], None, workers=0, batch_size=16, device="cpu",
            tta=True, progress=False)
seconds = time.perf_counter() - t0
peak = scoring["peak"]
tracemalloc.stop()
np.savez(out, prediction=r.images.prediction.to_numpy(), attention=r.images.attention.to_numpy(),
         cancer=r.submission.cancer.to_numpy())
print(json.dumps({"images": len(r.images), "breasts": len(r.submission), "seconds": seconds,
                  "traced_peak_mb": peak / 2**20, "rss_mb": resource.getrusage(
                      resource.RUSAGE_SELF).ru_maxrss / 1024, "held_views": max(held)}))
"""


def make_checkpoint(model: str, size: tuple[int, int], out: Path) -> Path:
    """A breast-level checkpoint, randomly initialised, saved as training saves one."""
    import torch

    from rsna_utils.image.preprocess import PreprocessConfig
    from rsna_utils.learn.breast import create_breast_model
    from rsna_utils.learn.checkpoint import Checkpoint, InputSpec
    from rsna_utils.learn.models import input_norm
    torch.manual_seed(0)
    m = create_breast_model(model, 3, global_pool="avg", outputs=1, legacy_pool=True).eval()
    for lin in (m.attention_v, m.attention_u, m.attention_w, m.head):
        torch.nn.init.normal_(lin.weight, std=0.5)
    mean, std = input_norm(model)
    p = out / f"breast_{model}.pt"
    Checkpoint(m.state_dict(), model, InputSpec(size, 3, (mean, std), level="breast"),
               preprocess=PreprocessConfig(size=list(size)).to_dict()).save(p)
    return p


def run(data: Path, csv: Path, ckpt: Path, mode: str, out: Path, chunk: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(data), str(csv), str(ckpt),
                        mode, str(out), str(chunk)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"predict ({mode}, {csv.name}) failed: {r.stderr.strip()[-600:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    from rsna_utils.core.sizes import parse_size
    from rsna_utils.sources.synth import synthesize
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", default="50,100,200", help="test patients per set")
    ap.add_argument("--model", default="resnet50", help="the breast model's backbone (resnet50: "
                    "2,048 features a view, as wide as the plans' ConvNeXt's 768 x 2.7)")
    ap.add_argument("--size", default="64x32", help="preprocessing and model input size")
    ap.add_argument("--chunk", type=int, default=16, help="breasts pooled a call, in both "
                    "modes (the package's POOL_CHUNK is 512, about 1,200 views: what `after` "
                    "holds at most; a small one shows the bound on a small test set)")
    ap.add_argument("--keep", default=None, help="folder for the data (default: a temporary one)")
    a = ap.parse_args()
    counts = [int(x) for x in a.patients.split(",")]
    size = tuple(parse_size(a.size, 16))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        data = root / "synth"
        t0 = time.perf_counter()
        if not (data / "test.csv").exists():
            synthesize(data, patients=2, test_patients=max(counts), seed=11, size="small",
                       workers=os.cpu_count(), progress=False)
        print(f"synthetic set: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        test = pd.read_csv(data / "test.csv")
        ckpt = make_checkpoint(a.model, size, root)
        rows = []
        for n in counts:
            keep = list(dict.fromkeys(test.patient_id))[:n]
            csv = root / f"test_{n}.csv"
            test[test.patient_id.isin(keep)].to_csv(csv, index=False)
            got = {}
            for mode in ("before", "after"):
                got[mode] = run(data, csv, ckpt, mode, root / f"{mode}_{n}.npz", a.chunk)
                print(f"{n} patients, {mode}: {got[mode]}", file=sys.stderr, flush=True)
            b, f = (np.load(root / f"{m}_{n}.npz") for m in ("before", "after"))
            for k in ("prediction", "attention", "cancer"):
                if not np.array_equal(b[k], f[k], equal_nan=True):
                    raise SystemExit(f"{n} patients: {k} differs between before and after "
                                     f"(max {np.nanmax(np.abs(b[k] - f[k])):.3g})")
            rows.append((n, got["before"], got["after"]))
    print(f"# predict's peak memory with a breast-level member ({a.model} @ {a.size}, flip "
          f"TTA, batch 16, 0 workers, {a.chunk} breasts pooled a call), {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| test patients | images | breasts | traced peak while scoring, before (MiB) | after (MiB) | peak RSS "
          "before (MiB) | after (MiB) | views' features held at once, before | after | "
          "seconds before | after | scores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, b, f in rows:
        print(f"| {n} | {b['images']} | {b['breasts']} | {b['traced_peak_mb']:.2f} | "
              f"{f['traced_peak_mb']:.2f} | {b['rss_mb']:.0f} | {f['rss_mb']:.0f} | "
              f"{b['held_views']} | {f['held_views']} | {b['seconds']:.1f} | {f['seconds']:.1f} | "
              "equal bit for bit |")
    if len(rows) > 1:
        (n0, b0, f0), (n1, b1, f1) = rows[0], rows[-1]
        di = b1["images"] - b0["images"]
        print(f"\nGrowth per test image ({b0['images']} -> {b1['images']} images): before "
              f"{(b1['traced_peak_mb'] - b0['traced_peak_mb']) * 2**20 / di / 1024:.2f} KiB, after "
              f"{(f1['traced_peak_mb'] - f0['traced_peak_mb']) * 2**20 / di / 1024:.2f} KiB "
              "(traced).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
