"""How often each positive is seen per epoch, and the positives' share of the loss at the
start, for training settings on a train.csv (issue 30: "positives counted once").

    python benchmarks/balance.py [--csv ../shared/realdata/rsna_meta/train_folds.csv]

One fold's training part (3 of 4 folds, by patient) of the competition's train.csv; prints one
row per setting, as in BENCHMARKS.md. Nothing is trained: the sampler draws one epoch."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from rsna_utils.learn.data import balance, patient_folds

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {   # name: (upsample, target_ratio, min_positives, pos_weight, batch_size)
    "old kaggle plan, resnext50 (upsample 5, 1 per batch, pos_weight 5)": (5.0, None, 1, 5.0, 16),
    "old kaggle plan, efficientnet_b2 (the same at batch 8)": (5.0, None, 1, 5.0, 8),
    "TrainConfig defaults (target_ratio 0.1, pos_weight 1)": (1.0, 0.1, 0, 1.0, 16),
    "1st place: sampler 1:7, 1 per batch, pos_weight 1": (1.0, 0.125, 1, 1.0, 16),
    "no sampler, no weight (the data as it is)": (1.0, None, 0, 1.0, 16),
}


def plan_settings() -> dict:
    """The kaggle plan's own models as it stands (notebooks/plans/kaggle.yaml)."""
    from rsna_utils.app.notebooks import load_plan
    from rsna_utils.learn.train_config import ratio_flag
    plan = load_plan("kaggle")
    out = {}
    for key in ("resnext50", "efficientnet", "convnext"):
        m = plan.get(key)
        if m:
            out[f"kaggle plan now, {m['model']} (batch {m['batch_size']})"] = (
                float(m.get("upsample", 1.0)), ratio_flag(m.get("target_ratio", 0.1)),
                int(m.get("min_positives", 0)), float(m.get("pos_weight", 1.0)), int(m["batch_size"]))
    return out


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--csv", default=str(REPO.parent / "shared/realdata/rsna_meta/train_folds.csv"))
    args = a.parse_args()
    df = pd.read_csv(args.csv)
    folds = patient_folds(df, 4, 42)
    train = df[folds != 0]
    labels = train["cancer"].to_numpy()
    print(f"{args.csv}: {len(df)} images; fold 0's training part: {len(train)} images, "
          f"{int(labels.sum())} positive ({labels.mean():.2%})")
    print("| setting | positives seen per epoch | positives' share of the epoch | positives' "
          "share of the loss at the start | times their natural weight |")
    print("|---|---|---|---|---|")
    for name, (up, ratio, minpos, w, bs) in {**plan_settings(), **SETTINGS}.items():
        b = balance(labels, up, ratio, bs, minpos, w)
        print(f"| {name} | {b.exposures:.1f} | {b.epoch_share:.1%} | {b.loss_share:.1%} | "
              f"{b.loss_share / b.natural_share:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
