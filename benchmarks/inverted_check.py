"""Does preprocessing's `looks_inverted` check (white edges after windowing) find real negatives?

On the wrapped real RSNA images of benchmarks/realdata.py: an older wrap that labelled every
image MONOCHROME2 (so the export's 270 negatives are mislabelled), and the corrected wrap (those
270 labelled MONOCHROME1). Each DICOM is decoded and planned as `rsna preprocess` plans it; the
flags are written to benchmarks/results/inverted_check_<wrap>.csv and summarised.

    python benchmarks/inverted_check.py [--wraps data/realdata/dcm data/realdata_m1/dcm]

About 8 min per 1,727 images on one core.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image import roi
    from rsna_utils.image.plan import make_plan
    from rsna_utils.image.preprocess import PreprocessConfig
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wraps", nargs="+", default=["data/realdata/dcm", "data/realdata_m1/dcm"])
    a = ap.parse_args()
    cfg = PreprocessConfig(size=(640, 320))
    out = {}
    for wrap in a.wraps:
        root = REPO / wrap
        name = root.parent.name
        rows = []
        t0 = time.time()
        for part in ("train", "test"):
            df = pd.read_csv(root / f"{part}.csv")
            for r in df.itertuples():
                p = root / f"{part}_images" / str(r.patient_id) / f"{r.image_id}.dcm"
                h = read_header(p)
                px, _ = decode_pixels(h, "auto")
                try:
                    flag = make_plan(h, roi.subsample(px, cfg.roi_max_side), cfg, px.shape).looks_inverted
                except Exception as e:
                    print("failed:", p, str(e)[:100], flush=True)
                    flag = None
                rows.append(dict(image_id=r.image_id, machine_id=r.machine_id, photometric=h.photometric,
                                 looks_inverted=flag))
        d = pd.DataFrame(rows)
        d.to_csv(REPO / "benchmarks" / "results" / f"inverted_check_{name}.csv", index=False)
        out[name] = dict(images=len(d), flagged=int(d.looks_inverted.fillna(False).astype(bool).sum()),
                         by_photometric=d.assign(f=d.looks_inverted.fillna(False).astype(bool)).groupby("photometric").f.agg(["size", "sum"]).to_dict(),
                         seconds=round(time.time() - t0))
        print(name, out[name], flush=True)
    if len(out) == 2:      # the same images in both wraps: is a flag in one a MONOCHROME1 in the other?
        old, new = (pd.read_csv(REPO / "benchmarks" / "results" / f"inverted_check_{n}.csv")
                    for n in out)
        m = old.merge(new, on="image_id", suffixes=("_first", "_second"))
        print(pd.crosstab(m.looks_inverted_first.astype(str), m.photometric_second))
    (REPO / "benchmarks" / "results" / "inverted_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
