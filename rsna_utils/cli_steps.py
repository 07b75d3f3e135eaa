"""Subcommands for preprocessing, training and prediction (registered by rsna_utils.cli)."""
from __future__ import annotations

import argparse


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 512 or HEIGHTxWIDTH such as 1024x512")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: give 512 or HEIGHTxWIDTH, each >= 8")
    return parts[0], parts[1]


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from rsna_utils.preprocess import PreprocessConfig, Preprocessor
    cfg = PreprocessConfig(size=a.size, resize_mode=a.resize_mode, bits=a.bits, margin=a.margin,
                           flip=a.flip, window_index=a.window_index,
                           window_first=a.window_first, max_pixels=a.max_pixels)
    s = Preprocessor(cfg, backend=a.backend, workers=a.workers,
                     progress=not a.quiet).run(a.images, a.csv, a.out, a.shard)
    print(s.line())
    return 1 if s.processed == 0 and s.failed > 0 else 0


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="DICOM folder -> cropped, windowed, resized PNGs")
    p.add_argument("--images", required=True, help="folder of {patient_id}/{image_id}.dcm")
    p.add_argument("--csv", default=None, help="train.csv / test.csv (default: scan --images)")
    p.add_argument("--out", required=True, help="output folder (PNGs, meta.csv, failures.csv)")
    p.add_argument("--size", type=_size, default=(512, 512), help="512 or HEIGHTxWIDTH")
    p.add_argument("--resize-mode", choices=["stretch", "pad"], default="stretch")
    p.add_argument("--bits", type=int, choices=[8, 16], default=8)
    p.add_argument("--margin", type=float, default=0.0, help="grow the ROI box (fraction)")
    p.add_argument("--flip", choices=["none", "mass", "laterality"], default="mass",
                   help="mirror so the chest wall is on the left (default: by pixel mass)")
    p.add_argument("--window-index", type=int, default=0, help="which window when several")
    p.add_argument("--window-first", action="store_true",
                   help="window at full resolution before resizing (slower)")
    p.add_argument("--backend", default="auto",
                   help="auto, dicomsdl, pydicom (GPU: nvimgcodec, dali)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--shard", default=None, help="K/N: process shard K (from 0) of N")
    p.add_argument("--max-pixels", type=int, default=80_000_000,
                   help="refuse headers declaring more pixels than this")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_preprocess)
