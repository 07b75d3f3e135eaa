"""Benchmark the CPU preprocessing: raw decode only vs the whole pipeline, on the same files,
in one run; worker scaling; peak memory on a 5,000 x 4,000 image.

    python benchmarks/preprocess.py [--data DIR] [--patients 4] [--repeats 3]

Prints markdown tables (copy them into BENCHMARKS.md with the machine and date).
Ratios are what to compare across machines; the absolute figures drift with load.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsna_utils.dicom.decoders import registry as decoders  # noqa: E402
from rsna_utils.dicom.header import read_header
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor, preprocess_image, write_png  # noqa: E402
from rsna_utils.sources.synth import synthesize  # noqa: E402

TS_NAMES = {"1.2.840.10008.1.2.4.90": "JPEG 2000", "1.2.840.10008.1.2.4.70": "JPEG Lossless"}


def _time(fn, repeats: int) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return statistics.median(best) * 1e3


def per_file(files: list[Path], repeats: int, size: int, out: Path) -> pd.DataFrame:
    cfg = PreprocessConfig(size=size)
    rows = []
    for f in files:
        h = read_header(f)
        if h.transfer_syntax not in TS_NAMES:
            continue
        r = dict(file=f.name, syntax=TS_NAMES[h.transfer_syntax], size=f"{h.rows}x{h.columns}")
        for name, fn in ((n, decoders.get(n).decode) for n in decoders.CPU_ORDER):
            r[f"{name}_ms"] = _time(lambda: fn(str(f), read_header(f)), repeats)

        def pipeline():
            img, _ = preprocess_image(f, cfg)
            write_png(out / f"{f.stem}.png", img)
        r["pipeline_ms"] = _time(pipeline, repeats)
        rows.append(r)
    return pd.DataFrame(rows)


def scaling(images: Path, csv: Path, size: int, workers: list[int]) -> dict[int, float]:
    rates = {}
    for w in workers:
        with tempfile.TemporaryDirectory() as d:
            s = Preprocessor(PreprocessConfig(size=size), workers=w, progress=False).run(images, csv, d)
            rates[w] = s.processed / s.seconds
    return rates


MAKE_BIG = r"""
import sys, numpy as np, imagecodecs
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
rows, cols = 5000, 4000
yy, xx = np.mgrid[0:rows, 0:cols]
img = (((yy - 2500) / 2200.0) ** 2 + (xx / 3000.0) ** 2 <= 1) * (1500 + (xx * 7 + yy * 3) % 1000)
img = img.astype(np.uint16)
ds = Dataset(); ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = sys.argv[2]
ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3.4"
ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
ds.PhotometricInterpretation = "MONOCHROME2"
ds.WindowCenter, ds.WindowWidth = 2000, 1200
if sys.argv[2].endswith(".90"):
    frame = imagecodecs.jpeg2k_encode(img, level=0, reversible=True, codecformat="jp2", bitspersample=12)
else:
    frame = imagecodecs.jpeg8_encode(img, lossless=True, predictor=1, bitspersample=12)
ds.PixelData = encapsulate([bytes(frame)]); ds["PixelData"].VR = "OB"
ds.save_as(sys.argv[1], enforce_file_format=True)
"""
# A fresh process: imports, one warm-up image, then the big one; peak RSS before and after.
PEAK_SCRIPT = r"""
import resource, sys
sys.path.insert(0, sys.argv[2])
from rsna_utils.image.preprocess import PreprocessConfig, preprocess_image
preprocess_image(sys.argv[3], PreprocessConfig(size=512))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
preprocess_image(sys.argv[1], PreprocessConfig(size=512))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base / 1024, peak / 1024)
"""


def peak_memory(syntax: str, warmup: Path) -> tuple[float, float]:
    """(peak RSS MiB of a worker process on the big image, of which the image work added)."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-c", MAKE_BIG, f"{d}/big.dcm", syntax], check=True)
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, f"{d}/big.dcm", str(REPO),
                            str(warmup)], capture_output=True, text=True, check=True)
    base, peak = (float(x) for x in r.stdout.split())
    return peak, peak - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "data" / "bench_full"))
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train.csv").exists():
        print(f"generating {args.patients} full-size patients in {data} ...", file=sys.stderr)
        synthesize(data, patients=args.patients, seed=1, size="full", test_patients=0)
    files = sorted((data / "train_images").glob("*/*.dcm"))
    print(f"# CPU preprocessing benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {len(files)} files, size {args.size}")
    with tempfile.TemporaryDirectory() as d:
        df = per_file(files, args.repeats, args.size, Path(d))
    dec = [c for c in df.columns if c.endswith("_ms") and c != "pipeline_ms"]
    df["fastest_decode_ms"] = df[dec].min(axis=1)
    g = df.groupby(["syntax", "size"])[dec + ["fastest_decode_ms", "pipeline_ms"]].median()
    g["pipeline/decode throughput"] = g["fastest_decode_ms"] / g["pipeline_ms"]
    print("\n## One process, median ms per image (decode only per backend, then the whole pipeline)\n")
    print(g.round(3).to_markdown() if _has_tabulate() else g.round(3).to_string())
    rates = scaling(data / "train_images", data / "train.csv", args.size, [1, 2])
    print(f"\n## Workers: 1 -> {rates[1]:.2f} img/s, 2 -> {rates[2]:.2f} img/s, "
          f"scaling {rates[2] / rates[1]:.2f}x")
    for syn in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"):
        peak, added = peak_memory(syn, files[0])
        print(f"## Peak RSS of one worker process (interpreter and libraries included) on a "
              f"5000x4000 {TS_NAMES[syn]} image: {peak:.0f} MiB")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
