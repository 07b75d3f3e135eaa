"""GPU benchmark, one run on one machine (issues 4, 5, 6):

1. decode-only ceiling: nvImageCodec batched decode of the frames (already in memory);
2. end-to-end preprocessing, DICOM files -> PNG files, with nvImageCodec and with DALI;
3. the all-core CPU pipeline on the JPEG 2000 files (for the GPU / CPU ratio);
4. training throughput from the preprocessed 512 PNGs vs random input (same model and batch);
5. inference end to end (DICOM -> submission) with one resnext50_32x4d @ 512.

    python benchmarks/gpu_bench.py [--data data/bench_gpu] [--patients 16]

Prints a short markdown table last. Needs CUDA, torch, timm and requirements-gpu.txt.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def decode_ceiling(files, batch: int = 64) -> float:
    from rsna_utils.dicom_io import read_header
    from rsna_utils.frames import first_frame
    from rsna_utils.gpu import GPU_SYNTAXES, NvImageCodecDecoder
    import torch
    frames = [first_frame(str(f)) for f in files if read_header(f).transfer_syntax in GPU_SYNTAXES]
    dec = NvImageCodecDecoder("cuda")
    dec.decode(frames[:4])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(frames), batch):
        n += sum(x is not None for x in dec.decode(frames[i:i + batch]))
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def end_to_end(data: Path, backend: str, size: int = 512) -> tuple[float, int]:
    from rsna_utils.gpu import GpuPreprocessor
    from rsna_utils.preprocess import PreprocessConfig
    with tempfile.TemporaryDirectory() as d:
        s = GpuPreprocessor(PreprocessConfig(size=size), backend=backend, batch_size=64,
                            png_threads=12, progress=False).run(data / "train_images", data / "train.csv", d)
    return s.processed / s.seconds, s.fallbacks


def cpu_pipeline(data: Path, syntax: str, workers: int, size: int = 512) -> float:
    import pandas as pd
    from rsna_utils.dicom_io import read_header
    from rsna_utils.preprocess import PreprocessConfig, Preprocessor
    df = pd.read_csv(data / "train.csv")
    keep = [read_header(data / "train_images" / str(r.patient_id) / f"{r.image_id}.dcm").transfer_syntax == syntax
            for r in df.itertuples()]
    with tempfile.TemporaryDirectory() as d:
        df[keep].to_csv(Path(d) / "sub.csv", index=False)
        s = Preprocessor(PreprocessConfig(size=size), workers=workers, progress=False).run(
            data / "train_images", Path(d) / "sub.csv", Path(d) / "out")
    return s.processed / s.seconds


def train_feed(png_dir: Path, csv: Path, model_name: str, batch: int, steps: int = 30) -> tuple[float, float]:
    """(img/s from random tensors, img/s from the PNG DataLoader) for one model and batch."""
    import torch
    from torch.utils.data import DataLoader
    from rsna_utils.data import PngDataset, UpsampleSampler, load_table, Augment
    from rsna_utils.models import WeightedBCE, create_model
    dev = torch.device("cuda")
    model = create_model(model_name).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = WeightedBCE(5, 1)

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    x = torch.randn(batch, 3, 512, 512, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, device=dev)
    for _ in range(5):
        step(x, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    ceiling = steps * batch / (time.perf_counter() - t0)
    df = load_table(csv, png_dir)
    ds = PngDataset(df, 512, 3, Augment(), cache=False)
    dl = DataLoader(ds, batch, sampler=UpsampleSampler(ds.labels, upsample=5), num_workers=14,
                    pin_memory=True, persistent_workers=True, prefetch_factor=4,
                    multiprocessing_context="forkserver", drop_last=True)
    it = iter(dl)
    for _ in range(3):
        xb, yb = next(it)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for k in range(steps):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(dl)
            xb, yb = next(it)
        step(xb.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last),
             yb.to(dev, non_blocking=True))
        n += len(xb)
    torch.cuda.synchronize()
    return ceiling, n / (time.perf_counter() - t0)


def inference(data: Path, ckpt_dir: Path) -> float:
    import torch
    from rsna_utils.models import create_model, save_checkpoint
    from rsna_utils.predict import predict
    from rsna_utils.preprocess import PreprocessConfig
    ck = ckpt_dir / "resnext50_512.pt"
    m = create_model("resnext50_32x4d")
    save_checkpoint({"model": {k: v for k, v in m.state_dict().items()}, "model_name": "resnext50_32x4d",
                     "channels": 3, "size": [512, 512], "preprocess": PreprocessConfig(size=512).to_dict(),
                     "threshold": 0.5, "prior": 0.021}, ck)
    r = predict(data / "train_images", data / "train.csv", [ck], ckpt_dir / "sub.csv",
                batch_size=32, workers=14, device="cuda", progress=False)
    return len(r.images) / r.seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO / "data" / "bench_gpu"))
    ap.add_argument("--patients", type=int, default=16)
    args = ap.parse_args()
    import torch
    from rsna_utils.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.synth import synthesize
    data = Path(args.data)
    if not (data / "train.csv").exists():
        synthesize(data, patients=args.patients, seed=2, size="full", test_patients=0, progress=False)
    files = sorted((data / "train_images").glob("*/*.dcm"))
    rows = []
    ceiling = decode_ceiling(files)
    rows.append(("decode only, nvImageCodec batch 64 (ceiling)", ceiling, ""))
    for b in ("nvimgcodec", "dali"):
        try:
            rate, fb = end_to_end(data, b)
            rows.append((f"end to end DICOM -> PNG, {b}", rate, f"{rate / ceiling:.2f}x ceiling, {fb} CPU fallbacks"))
        except Exception as e:  # report and go on: one backend missing must not hide the rest
            rows.append((f"end to end, {b}", float("nan"), f"failed: {type(e).__name__}: {e}"))
    cpu = cpu_pipeline(data, "1.2.840.10008.1.2.4.90", os.cpu_count() or 1)
    rows.append((f"CPU pipeline, JPEG 2000, {os.cpu_count()} processes", cpu, ""))
    with tempfile.TemporaryDirectory() as d:
        s = Preprocessor(PreprocessConfig(size=512), workers=os.cpu_count(), progress=False).run(
            data / "train_images", data / "train.csv", d)
        for name, batch in (("resnext50_32x4d", 32), ("efficientnet_b0", 32)):
            ceil_t, feed = train_feed(Path(d), data / "train.csv", name, batch)
            rows.append((f"train {name} @512 b{batch}: random input", ceil_t, ""))
            rows.append((f"train {name} @512 b{batch}: from PNGs", feed, f"{feed / ceil_t:.2f}x random input"))
        rate = inference(data, Path(d))
        rows.append(("inference DICOM -> submission, resnext50_32x4d @512", rate, f"{rate / ceiling:.2f}x decode ceiling"))
    print(f"\n# GPU benchmark: {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d')}, {len(files)} full-size files\n")
    print("| what | img/s | note |\n|---|---|---|")
    for what, rate, note in rows:
        print(f"| {what} | {rate:.1f} | {note} |")
    gpu_e2e = [r for r in rows if r[0].startswith("end to end DICOM -> PNG, nvimgcodec")]
    if gpu_e2e and cpu:
        print(f"\nGPU end to end / CPU all-core JPEG 2000 pipeline: {gpu_e2e[0][1] / cpu:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
