"""Real-data learning benchmark (issues 11 and 37): do real RSNA mammograms learn, and can this
instrument rank two recipes?

`../shared/realdata/rsna_dev` (or $RSNA_REALDATA: 1,727 real RSNA images exported as 8-bit
JPEGs, 574 with cancer) is wrapped as an RSNA-shaped DICOM dataset (`rsna_utils.sources.realdata`)
and preprocessed as a user would (`rsna preprocess`). Then, in one of two modes:

- held-out (default): a quarter of the patients is held out; `rsna train` trains --folds folds
  on the rest, `rsna predict --labels` scores the held-out patients, and the training part is
  also scored out of fold;
- --all-oof: every image (train and held-out parts together) goes into --folds patient-grouped
  folds and every breast is scored by the fold model that did not train on it (about 250
  positive breasts instead of 61); --seeds 2 repeats with a second seed (new folds, new
  initialisation), paired by breast.

Both compare against the baseline the issue names: a logistic regression on the frozen ImageNet
features of the same backbone, fitted on the same folds. `--versus RUN` pairs this run with
another of the same mode, breast by breast, with a patient-bootstrap interval and the smallest
difference that interval can resolve. Every run scores both best.pt (the epoch validation chose)
and last.pt (the last epoch; with EMA, its averaged weights, which are what best.pt holds).

Training settings are TrainConfig's (`rsna train`'s flags, the same derivation, every field):
a setting not given takes --config's YAML, then the recipe's (RECIPES, SCALE below), then
TrainConfig's default. Each fold is trained by `rsna train --config <its TrainConfig as YAML>`.

    python benchmarks/realdata.py [--recipe new|old] [--size 384x192] [--epochs 4] [--folds 4]
        [--steps N] [--all-oof [--seeds 2]] [--versus RUN] [any rsna train flag]

`--steps N` sets each fold's epochs (and per-epoch cap) so it takes exactly N optimiser steps,
whatever its recipe's epoch length. Writes `benchmarks/results/realdata_<date>_....json` and the
training curves as a PNG; `--folds 0` trains one holdout run instead (held-out mode only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def find_realdata() -> Path | None:
    """$RSNA_REALDATA, else ../shared/realdata/rsna_dev beside the repository (the project's
    layout; the package itself never looks for data)."""
    for c in (os.environ.get("RSNA_REALDATA"), REPO.parent / "shared" / "realdata" / "rsna_dev"):
        if c and (Path(c) / "malignant").is_dir() and (Path(c) / "benign").is_dir():
            return Path(c)
    return None


def find_meta() -> Path | None:
    """$RSNA_META, else ../shared/realdata/rsna_meta/train_folds.csv (the competition's
    train.csv): the export's images gain their true laterality, view, site, age..."""
    for c in (os.environ.get("RSNA_META"),
              REPO.parent / "shared" / "realdata" / "rsna_meta" / "train_folds.csv"):
        if c and Path(c).is_file():
            return Path(c)
    return None


# -- training settings: TrainConfig's, with what this script states in SCALE and RECIPES -------

# The instrument's scale on this CPU: where it differs from TrainConfig's defaults (resnet18 at
# 256, 2 epochs, no augmentation, 5 folds). Everything not named here or in a recipe is
# TrainConfig's default (e.g. global_pool gem, lr 3e-4, batch 16, select_by auc).
SCALE = dict(model="tf_efficientnet_lite0", pretrained_path="pypi", size="384x192", epochs=4,
             augment=True, tta=True, folds=4, workers=2, progress=False)
# The balance and regularisation of the kaggle plan, scaled to this CPU: `old` is the plan before
# issue 30 (upsample 5 + pos_weight 5, weight decay 1e-4 on everything, one epoch's AUC picks
# best.pt), `new` the plan after it (1st place: a 1:7 sampler, one positive per batch, no loss
# weight; decoupled weight decay 1e-2 off norms and biases, EMA over half an epoch, stochastic
# depth, best.pt by the mean breast AUC of the last two epochs). Values as TrainConfig takes them.
RECIPES = {
    "old": dict(upsample=5.0, target_ratio=None, min_positives=1, pos_weight=5.0,
                weight_decay=1e-4, ema_epochs=0.0, drop_path=0.0, select_window=1),
    "new": dict(upsample=1.0, target_ratio="1:7", min_positives=1, pos_weight=1.0,
                weight_decay=1e-2, ema_epochs=0.5, drop_path=0.1, select_window=2),
}
# the kaggle plan's auxiliary targets (2nd place: x0.1 heads); only with the metadata
AUX = "BIRADS,density,view,difficult_negative_case,invasive,age"
# TrainConfig fields this script sets for each run (the wrap's files, the run folder, the fold)
PER_RUN = ("data", "csv", "out", "split", "fold", "resume")
# config.json fields that may differ between a finished run and the one asked for
NOT_RECIPE = frozenset({"out", "resume", "overwrite", "progress", "workers", "device", "cache",
                        "extra"})


def build_parser() -> argparse.ArgumentParser:
    """This script's own flags, then one flag per TrainConfig field (`core.config.add_flags`,
    as `rsna train` makes them: same names, types, choices; no defaults on the namespace, so
    only what was typed overrides the recipe)."""
    from rsna_utils.core.config import add_flags
    from rsna_utils.learn.train_config import TrainConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--src", default=None, help="the export's folder (benign/, malignant/); "
                    "default $RSNA_REALDATA or ../shared/realdata/rsna_dev")
    ap.add_argument("--meta", default=None, help="the competition's train.csv for those images "
                    "(default $RSNA_META or ../shared/realdata/rsna_meta/train_folds.csv; none: "
                    "wrap without it, sides from the pixels, no views)")
    ap.add_argument("--recipe", default="new", choices=tuple(RECIPES),
                    help="balance and regularisation (RECIPES): new (the kaggle plan's) or old "
                         "(before issue 30); training flags override its parts")
    ap.add_argument("--config", default=None, help="YAML of TrainConfig fields, over the recipe "
                    "and under the flags")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps each fold takes: "
                    "its epochs (and max_steps) are set so it takes exactly this many, whatever "
                    "the recipe's epoch length (equal steps for two recipes)")
    ap.add_argument("--all-oof", action="store_true", help="every image in --folds patient-"
                    "grouped folds, every breast scored out of fold (no held-out part)")
    ap.add_argument("--seeds", type=int, default=1, help="--all-oof: repeat with this many "
                    "seeds (--seed, --seed + 1, ...): new folds and initialisation, paired by "
                    "breast")
    ap.add_argument("--n-boot", type=int, default=2000, help="patient-bootstrap resamples")
    ap.add_argument("--versus", default=None, help="another run folder of this script (same "
                    "--work, same mode): paired patient-bootstrap differences, this run minus "
                    "that one")
    ap.add_argument("--pool", nargs="+", default=None, metavar="RUN",
                    help="no training: pool the folders of --all-oof runs of different seeds "
                         "(run one at a time) and print their AUCs; with --versus-pool, the "
                         "paired differences over every seed")
    ap.add_argument("--versus-pool", nargs="+", default=None, metavar="RUN",
                    help="with --pool: the other recipe's folders, the same seeds")
    ap.add_argument("--work", default=str(REPO / "data" / "realdata"))
    ap.add_argument("--png-size", default="640x320")
    ap.add_argument("--limit", type=int, default=None, help="wrap only about this many images")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--no-tta", dest="tta", action="store_const", const=False,
                    default=argparse.SUPPRESS, help="predict and validate without the flip")
    ap.add_argument("--val-tta", default=None, choices=("true", "false"),
                    help="validate the folds with the flip (default: as --tta, which also "
                         "sets the prediction's)")
    ap.add_argument("--pretrained", dest="pretrained_path", default=argparse.SUPPRESS,
                    help="as --pretrained-path")
    ap.add_argument("--tag", default="", help="suffix of the run folder and result files")
    ap.add_argument("--with-runs", nargs="+", default=None,
                    help="held-out mode with --folds: folders of fold*/ runs of other models "
                         "(e.g. another size) to ensemble with; outputs go to RUN/with_<their "
                         "names>; this run alone is also scored on the held-out patients")
    add_flags(ap.add_argument_group(
        "training (rsna train's flags, TrainConfig's fields)",
        "a setting not given takes --config's, then the recipe's (RECIPES, SCALE), then "
        "TrainConfig's default; --folds 0 (held-out mode): one holdout run"), TrainConfig)
    return ap


def train_settings(a: argparse.Namespace, has_meta: bool) -> tuple[dict, bool]:
    """(TrainConfig fields shared by every run of this invocation, whether to predict with the
    flip): SCALE, then RECIPES[a.recipe], then --config's YAML, then the flags given. The
    per-run fields (PER_RUN) are refused as flags. Rules: a fixed --ema replaces the recipe's
    ema_epochs; aux defaults to AUX with metadata ('none': off); a breast-level run drops the
    'view' target and, unless --batch-size is given, halves the batch (about the same views a
    step: 2 a breast with --breast-views 2, 2.3 on RSNA with all, the default)."""
    import yaml

    from rsna_utils.core.config import given_flags
    from rsna_utils.core.errors import RsnaError
    from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
    from rsna_utils.learn.train_config import TrainConfig
    given = given_flags(a, TrainConfig)
    owned = [k for k in PER_RUN if k in given]
    if owned:
        raise SystemExit(f"--{owned[0].replace('_', '-')}: this script sets it for each run (the "
                         "wrap under --work, the fold); leave it out")
    from_yaml = {}
    if a.config:
        from_yaml = yaml.safe_load(Path(a.config).read_text()) or {}
        unknown = sorted(set(from_yaml) - set(TrainConfig.field_names()))
        if unknown:
            raise SystemExit(f"{a.config}: unknown training option(s) {unknown}")
        if any(k in from_yaml for k in PER_RUN):
            raise SystemExit(f"{a.config}: {[k for k in PER_RUN if k in from_yaml]} are set by "
                             "this script for each run; remove them")
    typed = {**from_yaml, **given}
    s = {**SCALE, **RECIPES[a.recipe], **typed}
    if typed.get("ema") and "ema_epochs" not in typed:
        s["ema_epochs"] = 0.0                   # a fixed --ema replaces the recipe's
    try:        # one spelling, HEIGHTxWIDTH: run folders and result files are named by it
        s["size"] = "x".join(str(v) for v in parse_size(s["size"], MIN_MODEL_SIDE))
    except RsnaError as e:
        raise SystemExit(str(e)) from None
    predict_tta = bool(s["tta"])
    if getattr(a, "val_tta", None) is not None:
        s["tta"] = a.val_tta == "true"
    aux = s.get("aux") if "aux" in typed else (AUX if has_meta else [])
    if isinstance(aux, str):
        aux = aux.split(",")
    aux = [x.strip() for v in aux for x in str(v).split(",") if x.strip()]
    s["aux"] = [] if aux in (["none"], ["None"]) else aux
    if s.get("level") == "breast":          # 'view' is per image; a breast reads its views
        s["aux"] = [x for x in s["aux"] if x != "view"]
        if "batch_size" not in typed:
            s["batch_size"] = max(2, int(s.get("batch_size", 16)) // 2)
    return s, predict_tta


def run_config(settings: dict, **per_run):
    """The TrainConfig of one run: the shared settings and this run's fields; folds=0 is a
    holdout run. TrainConfig checks every value here, before anything trains."""
    from rsna_utils.core.errors import RsnaError
    from rsna_utils.learn.train_config import TrainConfig
    d = {**settings, **per_run}
    if not d.get("folds"):
        d.pop("folds", None)
        d.pop("fold", None)
        d["split"] = "holdout"
    try:
        return TrainConfig.from_dict(d)
    except RsnaError as e:
        raise SystemExit(str(e)) from None


def changed_fields(cfg) -> dict:
    """The fields of `cfg` that differ from TrainConfig's defaults (what a run states)."""
    from rsna_utils.learn.train_config import TrainConfig
    base = asdict(TrainConfig())
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_RECIPE and base.get(k) != v}


def config_differences(stored: dict, want: dict) -> dict:
    """{field: (stored, wanted)} for the recipe fields of a finished run's config.json that
    differ from the run asked for. A field the stored run lacks (made before it existed) counts
    as TrainConfig's default; sizes and ratios are compared as TrainConfig reads them."""
    from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
    from rsna_utils.learn.train_config import TrainConfig, ratio_flag
    base = asdict(TrainConfig())

    def norm(k, v):
        if k == "size":
            return tuple(parse_size(v, MIN_MODEL_SIDE))
        if k == "target_ratio":
            return ratio_flag(v)
        return v
    out = {}
    for k, v in want.items():
        if k in NOT_RECIPE:
            continue
        there = stored.get(k, base.get(k))
        if norm(k, there) != norm(k, v):
            out[k] = (there, v)
    return out


def fold_state(cfg) -> str:
    """'new', 'partial' (resume it) or 'done' (reuse it): a run folder is reused only when its
    config.json is the TrainConfig asked for; otherwise stop rather than score other models."""
    run = Path(cfg.out)
    cfg_file = run / "config.json"
    if not cfg_file.exists():
        return "new"
    differ = config_differences(json.loads(cfg_file.read_text()), asdict(cfg))
    if differ:
        raise SystemExit(f"{run} was trained with other settings ({differ}, as (there, asked)); "
                         "give another --tag or delete the folder")
    m = run / "metrics.csv"
    done = (run / "best.pt").exists() and m.exists() and len(pd.read_csv(m)) >= cfg.epochs
    return "done" if done else "partial"


# -- equal optimiser steps ------------------------------------------------------------------

def epoch_batches(cfg, table: pd.DataFrame | None = None) -> int:
    """Batches in one epoch of `cfg`'s training part, as its sampler draws them (upsample or
    target_ratio, min_positives: `data.balance`), read from its CSV and split (`make_split`),
    nothing written. `table`: the CSV's rows, when already read."""
    from rsna_utils.learn.data import balance, load_table
    from rsna_utils.learn.train import make_split
    if table is None:
        table = load_table(cfg.csv, cfg.data)
    train_df, _ = make_split(table, cfg, Path(cfg.out), write=False)
    if cfg.level == "breast":
        labels = train_df.groupby("prediction_id", sort=False).cancer.max().to_numpy()
    else:
        labels = train_df.cancer.to_numpy()
    b = balance(labels, cfg.upsample, cfg.target_ratio, cfg.batch_size, cfg.min_positives,
                cfg.pos_weight, cfg.neg_weight, cfg.seed)
    return math.ceil(b.epoch_images / cfg.batch_size)


def steps_budget(steps: int, batches_per_epoch: int, accumulate: int = 1) -> dict:
    """Epochs and per-epoch cap (TrainConfig.max_steps, in batches) that make a run take
    `steps` optimiser steps when a full epoch has `batches_per_epoch` batches: the fewest epochs
    that fit (each at most a full epoch), raised by up to a quarter until they divide `steps`
    exactly; where none does, the epochs of that range whose cap, rounded up, overshoots least
    (fewer steps over than epochs, said in `total`). Returns epochs, max_steps (None: full
    epochs), per_epoch, total, full_epoch (optimiser steps in a full epoch)."""
    if steps < 1:
        raise SystemExit(f"--steps {steps}: give a positive number of optimiser steps")
    full = max(1, batches_per_epoch // accumulate)       # optimiser steps in a full epoch
    first = math.ceil(steps / full)
    epochs = min(range(first, first + max(2, first // 4) + 1),
                 key=lambda e: (e * math.ceil(steps / e) - steps, e))
    per_epoch = math.ceil(steps / epochs)
    cap = None if per_epoch >= full else per_epoch * accumulate
    return dict(epochs=epochs, max_steps=cap, per_epoch=min(per_epoch, full),
                total=epochs * min(per_epoch, full), full_epoch=full)


def with_steps(cfg, steps: int, table: pd.DataFrame | None = None):
    """`cfg` with the epochs and max_steps of `steps_budget` for its epoch length; the plan
    printed."""
    b = steps_budget(steps, epoch_batches(cfg, table), cfg.accumulate)
    print(f"  steps: {Path(cfg.out).name}: {b['epochs']} epochs x {b['per_epoch']} optimiser "
          f"steps = {b['total']} (asked {steps}; a full epoch of this recipe: "
          f"{b['full_epoch']})", flush=True)
    return replace(cfg, epochs=b["epochs"], max_steps=b["max_steps"])


def steps_taken(run: Path, batch_size: int, accumulate: int = 1) -> int:
    """Optimiser steps a finished run took, from its metrics.csv (images seen per epoch)."""
    h = pd.read_csv(run / "metrics.csv")
    return int(sum(math.ceil(n / batch_size) // accumulate for n in h.train_images))


def train_run(cfg, steps: int | None = None, table: pd.DataFrame | None = None):
    """Train `cfg` with `rsna train --config` (its TrainConfig written as YAML beside the run)
    unless its folder already holds it; an interrupted run resumes. Returns the config run."""
    import yaml
    if steps:
        cfg = with_steps(cfg, steps, table)
    state = fold_state(cfg)
    if state != "done":
        cfg = replace(cfg, resume=state == "partial")
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "realdata_train.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        rsna("train", "--config", str(out / "realdata_train.yaml"))
    print(f"  {Path(cfg.out).name}: {steps_taken(Path(cfg.out), cfg.batch_size, cfg.accumulate)} "
          "optimiser steps taken", flush=True)
    return cfg


# -- scoring checkpoints ----------------------------------------------------------------------

def uses_ema(cfg: dict) -> bool:
    """Whether a run's best.pt holds averaged weights: a fixed ema decay or ema_epochs."""
    return bool(float(cfg.get("ema") or 0) > 0 or float(cfg.get("ema_epochs") or 0) > 0)


def last_scored(run: Path) -> Path:
    """The last epoch's model as its validation scored it: last.pt, or with EMA (`uses_ema`)
    last.pt's averaged weights written as RUN/last_ema.pt (last.pt's "model" is the live
    network; best.pt holds the average, so the two are compared like for like)."""
    last = run / "last.pt"
    if not uses_ema(json.loads((run / "config.json").read_text())):
        return last
    out = run / "last_ema.pt"
    if out.exists() and out.stat().st_mtime >= last.stat().st_mtime:
        return out
    from rsna_utils.learn.checkpoint import Checkpoint
    ck = Checkpoint.load(last)
    if not ck.ema:
        raise SystemExit(f"{last}: its run used EMA but the checkpoint holds no averaged weights")
    model = {k.removeprefix("module."): v for k, v in ck.ema.items() if k != "n_averaged"}
    ck.without_resume_state(model).save(out)
    return out


def rsna(*args: str) -> None:
    cmd = [sys.executable, "-m", "rsna_utils", *args]
    print("$ rsna " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def frozen_features(png: Path, df: pd.DataFrame, model_name: str, pretrained: str, size) -> np.ndarray:
    """Global-average-pooled ImageNet features of the frozen backbone, one row per image of df."""
    import cv2
    import torch

    from rsna_utils.learn.data import model_input
    from rsna_utils.learn.models import create_model, input_norm
    m = create_model(model_name, 3, pretrained).eval()
    m.reset_classifier(0)
    norm = input_norm(model_name)
    out = []
    with torch.inference_mode():
        for i in range(0, len(df), 32):
            xb = torch.stack([model_input(cv2.imread(str(png / f"{r.patient_id}_{r.image_id}.png"),
                                                     cv2.IMREAD_UNCHANGED), size, norm)
                              for r in df.iloc[i:i + 32].itertuples()])
            out.append(m(xb).numpy())
    return np.concatenate(out)


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))


def _with_png(df: pd.DataFrame, png: Path) -> pd.DataFrame:
    done = {p.stem for p in png.glob("*.png")}
    return df[[f"{r.patient_id}_{r.image_id}" in done for r in df.itertuples()]]


def frozen_probe(png: Path, data: Path, model_name: str, pretrained: str, size) -> dict:
    """Logistic regression on frozen ImageNet features (same PNGs, same patients out)."""
    from rsna_utils.learn.metrics import breast_level, pr_auc, roc_auc
    tr = _with_png(pd.read_csv(data / "train.csv"), png)
    te = _with_png(pd.read_csv(data / "test.csv").merge(
        pd.read_csv(data / "test_labels.csv")[["image_id", "cancer"]], on="image_id"), png)
    tr_feats = frozen_features(png, tr, model_name, pretrained, size)
    clf = _probe().fit(tr_feats, tr.cancer)
    te = te.assign(prediction=clf.predict_proba(frozen_features(png, te, model_name, pretrained,
                                                                size))[:, 1])
    b = breast_level(te)
    return dict(breast_auc=roc_auc(b.cancer, b.prediction), breast_pr_auc=pr_auc(b.cancer, b.prediction),
                image_auc=roc_auc(te.cancer, te.prediction)), te, (tr, tr_feats)


def _fold_predictions(ckpt: Path, val: pd.DataFrame, png: Path, tta: bool) -> np.ndarray:
    """One checkpoint's probabilities on its fold's validation PNGs (the input of training)."""
    import cv2
    import torch

    from rsna_utils.infer.scoring import batch_input, load_models, view_features
    from rsna_utils.learn.checkpoint import cancer_logit
    (m,), _ = load_models([ckpt], torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for i in range(0, len(val), 32):
            x = batch_input([cv2.imread(str(png / f"{r.patient_id}_{r.image_id}.png"), cv2.IMREAD_UNCHANGED)
                             for r in val.iloc[i:i + 32].itertuples()], m, m.channels, m.size)
            if m.level == "breast":        # each view's features; the breasts pooled below
                out.append(view_features(m.model, x, tta))
                continue
            p = torch.sigmoid(cancer_logit(m.model(x)))
            if tta:
                p = (p + torch.sigmoid(cancer_logit(m.model(torch.flip(x, dims=[3]))))) / 2
            out.append(p.numpy())
    if m.level == "breast":
        from rsna_utils.learn.breast import breast_scores
        f = np.concatenate(out).astype(np.float32)
        ok = np.ones(len(val), bool)
        return np.mean([breast_scores(m.model, f[:, k], ok, val.prediction_id.to_numpy(), "cpu")[0]
                        for k in range(f.shape[1])], axis=0)
    return np.concatenate(out)


def oof_versus_probe(runs: list[Path], png: Path, train_part: tuple[pd.DataFrame, np.ndarray]) -> dict:
    """The held-out quarter has few breasts (188 here); the training part has three times as many, and
    with k folds every one of them is scored by a model that never saw its patient. So the
    recipe and the probe are also compared out-of-fold, fold by fold on the same splits (the
    probe refitted on the other folds' features): once with the epoch that validation picked
    (best.pt; optimistic, the fold that scores also chose the epoch) and once with the last epoch
    (the last model, `last_scored`: no choice made on the scored patients). Runs of one fold (two
    models) are averaged, as the ensemble is."""
    from rsna_utils.reports.evaluate import compare_auc
    tr, feats = train_part          # the training part's images and their frozen features
    b = oof_breasts(oof_scores(runs, png, tr, feats), ("probe", "best", "last"))
    res = {c: compare_auc(b.cancer, b.probe, b[c], b.patient_id) for c in ("best", "last")}
    return dict(breasts=int(len(b)), positive_breasts=int(b.cancer.sum()), **res)


def held_out_breasts(images: pd.DataFrame, data: Path) -> pd.DataFrame:
    """The held-out images' predictions as breasts (mean of the views, as the submission), with
    their labels and patients: what a paired comparison of two runs resamples."""
    from rsna_utils.learn.metrics import breast_level
    lab = pd.read_csv(data / "test_labels.csv")[["image_id", "cancer"]]
    b = breast_level(images.drop(columns="cancer", errors="ignore").merge(lab, on="image_id")
                     .dropna(subset=["prediction"]))
    b["patient_id"] = b.prediction_id.str.rsplit("_", n=1).str[0]
    return b


def paired_versus(this: Path, other: Path) -> dict:
    """This run minus `other` on the same breasts, each with a paired patient-bootstrap interval:
    held-out breast AUC, PR-AUC and the F1 of the binarised calls (at each run's out-of-fold
    threshold and at its out-of-fold positive rate); out of fold, breast AUC and PR-AUC."""
    from rsna_utils.learn.metrics import breast_level
    from rsna_utils.reports.evaluate import compare_metric
    for f in ("held_out_breasts.csv", "oof_predictions.csv"):
        if not (other / f).exists():
            raise SystemExit(f"{other / f}: not found; --versus takes the folder of a run of this "
                             "script with --folds (where its ensemble.json lies)")
    a = pd.read_csv(other / "held_out_breasts.csv")
    b = pd.read_csv(this / "held_out_breasts.csv")
    j = a.merge(b, on=["prediction_id", "cancer"], suffixes=("_a", "_b"))
    if len(j) < max(len(a), len(b)) * 0.95:
        raise SystemExit(f"{other}: only {len(j)} of its {len(a)} held-out breasts are this run's; "
                         "compare runs on the same wrap (--work)")
    pid = j.prediction_id.str.rsplit("_", n=1).str[0]
    out = {"held_out": {}, "out_of_fold": {}, "held_out_breasts": int(len(j))}
    for name, col, metric in (("breast AUC", "prediction", "auc"), ("breast PR-AUC", "prediction", "pr_auc"),
                              ("pF1 at OOF threshold", "call_threshold", "pf1"),
                              ("pF1 at OOF positive rate", "call_quantile", "pf1")):
        if f"{col}_a" in j and f"{col}_b" in j:
            out["held_out"][name] = compare_metric(j.cancer, j[f"{col}_a"], j[f"{col}_b"], pid, metric)
    oa, ob = (breast_level(pd.read_csv(d / "oof_predictions.csv")) for d in (other, this))
    k = oa.merge(ob, on=["prediction_id", "cancer"], suffixes=("_a", "_b"))
    kid = k.prediction_id.str.rsplit("_", n=1).str[0]
    for name, metric in (("breast AUC", "auc"), ("breast PR-AUC", "pr_auc")):
        out["out_of_fold"][name] = compare_metric(k.cancer, k.prediction_a, k.prediction_b, kid, metric)
    out["out_of_fold_breasts"] = int(len(k))
    return out


def _held_out_alone(runs: list[Path], data: Path, run: Path, tta: bool) -> dict:
    """With --with-runs: this run's folds alone on the held-out patients (what the ensemble adds
    is then visible). Breast AUC / PR-AUC and image AUC."""
    from rsna_utils.infer.predict import predict
    r = predict(data / "test_images", data / "test.csv", [k / "best.pt" for k in runs],
                run / "submission_alone.csv", labels=data / "test_labels.csv", workers=2,
                progress=False, tta=tta)
    m = {k: float(r.metrics[k]) for k in ("breast_mean_auc", "breast_mean_pr_auc", "image_auc")}
    print(f"  this run alone on the held-out patients: breast AUC {m['breast_mean_auc']:.3f}",
          flush=True)
    return m



# -- every breast out of fold ---------------------------------------------------------------

def all_images(data: Path, meta: Path | None) -> Path:
    """data/all_images.csv: the wrap's train and held-out parts as one labelled table (the
    held-out rows get their labels from test_labels.csv and, with the metadata table, the
    columns train.csv has: the auxiliary targets). What --all-oof splits into folds."""
    tr = pd.read_csv(data / "train.csv")
    te = pd.read_csv(data / "test.csv").merge(
        pd.read_csv(data / "test_labels.csv")[["image_id", "cancer"]], on="image_id")
    missing = [c for c in tr.columns if c not in te.columns]
    if meta is not None and missing:
        m = pd.read_csv(meta, usecols=lambda c: c in {"image_id", *missing})
        te = te.merge(m, on="image_id", how="left")
    both = pd.concat([tr, te[[c for c in tr.columns if c in te.columns]]], ignore_index=True)
    if both.image_id.duplicated().any():
        raise SystemExit(f"{data}: an image is in both train.csv and test.csv")
    out = data / "all_images.csv"
    both.to_csv(out, index=False)
    return out


def oof_scores(runs: list[Path], png: Path, images: pd.DataFrame,
               feats: np.ndarray | None) -> pd.DataFrame:
    """Every image of `images` scored by the fold runs that did not train on it: `best` (its
    fold's val_predictions.csv, written with best.pt), `last` (the last epoch's model,
    `last_scored`) and, with `feats` (frozen features, one row per image), `probe` (the
    logistic regression refitted on the other folds' features). Runs of one fold (several
    models) are averaged, as the ensemble is. The folds must cover `images` exactly once."""
    images = images.reset_index(drop=True)
    if "prediction_id" not in images:          # a breast-level model pools its views by it
        images["prediction_id"] = images.patient_id.astype(str) + "_" + images.laterality
    by_fold: dict[int, list[tuple[Path, dict]]] = {}
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        by_fold.setdefault(int(cfg["fold"]), []).append((run, cfg))
    parts, seen = [], set()
    for k, members in sorted(by_fold.items()):
        val_ids = None
        best, last = [], []
        for run, cfg in members:
            sp = pd.read_csv(run / "splits.csv")
            ids = set(sp.image_id[sp.fold == k])
            if val_ids is not None and ids != val_ids:
                raise SystemExit(f"{run}: its fold {k} is not the fold {k} of {members[0][0]} "
                                 "(rerun the folds with one --folds and seed)")
            val_ids = ids
            is_val = images.image_id.isin(val_ids).to_numpy()
            val = images[is_val]
            pred = pd.read_csv(run / "val_predictions.csv").set_index("image_id").prediction
            if len(pred) != len(val) or not pred.index.isin(val.image_id).all():
                raise SystemExit(f"{run}: val_predictions.csv does not hold its fold's "
                                 f"{len(val)} validation images")
            best.append(pred.loc[val.image_id].to_numpy())
            last.append(_fold_predictions(last_scored(run), val, png, bool(cfg.get("tta", False))))
        if seen & val_ids:
            raise SystemExit(f"fold {k} shares validation images with another fold")
        seen |= val_ids
        part = val.assign(best=np.mean(best, 0), last=np.mean(last, 0))
        if feats is not None:
            part["probe"] = _probe().fit(feats[~is_val], images.cancer[~is_val]).predict_proba(
                feats[is_val])[:, 1]
        parts.append(part)
        print(f"  fold {k}: {len(val)} validation images scored by best.pt, "
              f"{len(members)} last model(s){' and the probe' if feats is not None else ''}",
              flush=True)
    if seen != set(images.image_id):
        raise SystemExit(f"the folds' validation sets cover {len(seen)} of {len(images)} images")
    return pd.concat(parts)


def oof_breasts(oof: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """One row per breast (mean of its views, as the submission) with its label, patient and
    each of `columns`."""
    from rsna_utils.learn.metrics import breast_level
    b = pd.concat([breast_level(oof, c).set_index("prediction_id")[[c] + (["cancer"] if i == 0 else [])]
                   for i, c in enumerate(columns)], axis=1).reset_index()
    b["patient_id"] = b.prediction_id.str.rsplit("_", n=1).str[0]
    return b


def paired_difference(y, a, b, patients, metric: str = "auc", n_boot: int = 2000,
                      seed: int = 0, ci: float = 0.95) -> dict:
    """B minus A on the same breasts, over one or more seeds: `a` and `b` are (rows,) or
    (rows, seeds) scores, column j of both from seed j (the same folds). The difference is the
    mean over seeds of metric(B_j) - metric(A_j); each patient-bootstrap resample draws
    patients once and scores every seed's pair on the same drawn rows (paired by breast and
    seed). Returns a, b (seed means), a_by_seed, b_by_seed, difference, difference_low/high
    (the `ci` percentile interval), resolution (half that interval's width: the smallest
    difference this interval can resolve; a true difference of that size gives an interval
    that just touches 0 about half the time), se (bootstrap standard error; 1.96 x se is the
    normal-theory resolution, for comparison), p_not_better, n_boot_valid."""
    from rsna_utils.reports.evaluate import (
        CHUNK,
        patient_bootstrap_counts,
        point_metrics,
        resampled_metrics,
    )
    y = np.asarray(y, np.float64)
    a = np.asarray(a, np.float64).reshape(len(y), -1)
    b = np.asarray(b, np.float64).reshape(len(y), -1)
    if a.shape != b.shape:
        raise SystemExit(f"paired_difference: {a.shape[1]} seed(s) against {b.shape[1]}; pair runs "
                         "of the same --seeds")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise SystemExit("paired_difference: NaN scores; every breast needs a score from both runs")
    codes, uniq = pd.factorize(pd.Series(patients))
    counts = patient_bootstrap_counts(len(uniq), n_boot, seed)
    d = []
    for s in range(0, n_boot, CHUNK):
        w = counts[s:s + CHUNK][:, codes]
        d.append(np.mean([resampled_metrics(y, b[:, j], w, 0.5)[metric]
                          - resampled_metrics(y, a[:, j], w, 0.5)[metric]
                          for j in range(a.shape[1])], axis=0))
    d = np.concatenate(d)
    d = d[np.isfinite(d)]
    a_by = [float(point_metrics(y, a[:, j], 0.5)[metric]) for j in range(a.shape[1])]
    b_by = [float(point_metrics(y, b[:, j], 0.5)[metric]) for j in range(b.shape[1])]
    lo, hi = np.percentile(d, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]) if d.size else (np.nan,) * 2
    return dict(metric=metric, a=float(np.mean(a_by)), b=float(np.mean(b_by)), a_by_seed=a_by,
                b_by_seed=b_by, difference=float(np.mean(b_by) - np.mean(a_by)),
                difference_low=float(lo), difference_high=float(hi),
                resolution=float((hi - lo) / 2), se=float(d.std(ddof=1)) if d.size > 1 else np.nan,
                p_not_better=float((d <= 0).mean()) if d.size else np.nan,
                n_boot_valid=int(d.size), breasts=int(len(y)),
                positive_breasts=int((y == 1).sum()), seeds=int(a.shape[1]))


def seed_columns(table: pd.DataFrame, which: str) -> list[str]:
    """`which`'s score columns of an oof_breasts.csv, seed by seed (best_s42, best_s43, ...)."""
    cols = [c for c in table.columns if c.startswith(f"{which}_s")]
    return sorted(cols, key=lambda c: int(c.rsplit("_s", 1)[1]))


def pair_runs(this: pd.DataFrame, other: pd.DataFrame, which: str) -> tuple:
    """(labels, other's scores, this run's scores, patients) of `which` (best, last, probe) on
    the breasts both runs scored, joined by breast (prediction_id), the seeds in order."""
    ca, cb = seed_columns(other, which), seed_columns(this, which)
    if not ca or len(ca) != len(cb):
        raise SystemExit(f"--versus: {len(ca)} seed(s) of {which} there, {len(cb)} here; pair "
                         "runs of the same --seeds")
    sa, sb = [c.rsplit("_s", 1)[1] for c in ca], [c.rsplit("_s", 1)[1] for c in cb]
    if sa != sb:
        raise SystemExit(f"--versus: seeds {', '.join(sa)} there, {', '.join(sb)} here; pair "
                         "runs of the same --seed (each seed makes its own folds)")
    left = other[["prediction_id", "cancer", "patient_id", *ca]].rename(
        columns={c: f"a{i}" for i, c in enumerate(ca)})
    right = this[["prediction_id", "cancer", *cb]].rename(columns={c: f"b{i}" for i, c in enumerate(cb)})
    j = left.merge(right, on=["prediction_id", "cancer"])
    if len(j) < 0.95 * max(len(this), len(other)):
        raise SystemExit(f"--versus: only {len(j)} breasts in common ({len(other)} there, "
                         f"{len(this)} here): compare runs on the same wrap (--work, --limit)")
    a = j[[f"a{i}" for i in range(len(ca))]].to_numpy()
    b = j[[f"b{i}" for i in range(len(cb))]].to_numpy()
    return j.cancer.to_numpy(), a, b, j.patient_id.to_numpy()


def pool_runs(folders) -> pd.DataFrame:
    """One oof_breasts.csv table from several --all-oof run folders of different seeds (each
    run on its own, e.g. one a session): their seed columns side by side, joined by breast.
    A seed in two folders, or folders that scored other breasts, is refused."""
    pooled, where = None, {}
    for f in map(Path, folders):
        path = f / "oof_breasts.csv"
        if not path.exists():
            raise SystemExit(f"{path}: not found; --pool takes the folders of --all-oof runs "
                             "(oof_<model>_<size><tag>)")
        t = pd.read_csv(path)
        cols = [c for c in t.columns if re.fullmatch(r"(best|last|probe)_s\d+", c)]
        if not cols:
            raise SystemExit(f"{path}: no score columns (best_s<seed>...); not an --all-oof table")
        for c in cols:
            if c in where:
                raise SystemExit(f"--pool: {c} is in {where[c]} and in {f}; pool runs of "
                                 "different seeds (--seed)")
            where[c] = f
        t = t[["prediction_id", "cancer", "patient_id", *cols]]
        if pooled is None:
            pooled = t
            continue
        n = max(len(pooled), len(t))
        pooled = pooled.merge(t.drop(columns="patient_id"), on=["prediction_id", "cancer"])
        if len(pooled) < 0.95 * n:
            raise SystemExit(f"--pool: {f} shares only {len(pooled)} of {n} breasts with the "
                             "folders before it; pool runs of the same wrap (--work, --limit)")
    return pooled


def run_pooled(a) -> int:
    """--pool A... --versus-pool B...: A's and B's folders pooled seed by seed (`pool_runs`),
    every breast's difference paired by breast and seed, as one --all-oof --seeds N run would
    print it; the result file under benchmarks/results."""
    this, other = pool_runs(a.pool), pool_runs(a.versus_pool) if a.versus_pool else None
    y = this.cancer.to_numpy()
    res = dict(mode="pooled", runs=[str(f) for f in a.pool], breasts=int(len(this)),
               positive_breasts=int(this.cancer.sum()), seeds=seed_columns(this, "best"))
    from rsna_utils.learn.metrics import roc_auc
    print(f"pooled: {len(a.pool)} folder(s), {len(this)} breasts ({int(this.cancer.sum())} "
          f"positive), seeds {', '.join(c.rsplit('_s', 1)[1] for c in seed_columns(this, 'best'))}")
    for c in ("best", "last"):
        res[f"{c}_auc_by_seed"] = [float(roc_auc(y, this[k])) for k in seed_columns(this, c)]
        print(f"  {c:5s} breast AUC by seed: " + ", ".join(f"{v:.3f}" for v in res[f"{c}_auc_by_seed"]))
    if other is not None:
        res["versus"] = {"runs": [str(f) for f in a.versus_pool]}
        print("\nthis minus the --versus-pool folders (paired by breast and seed; 'resolves' = "
              "half the 95% interval's width):")
        for c in ("best", "last"):
            for metric in ("auc", "pr_auc"):
                r = paired_difference(*pair_runs(this, other, c), metric, n_boot=a.n_boot)
                res["versus"][f"{c}_{metric}"] = r
                print_paired(f"{c}.pt breast {metric.replace('_', '-').upper()}", r)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "+".join(Path(f).name.removeprefix("oof_") for f in a.pool)
    path = out / f"realdata_{time.strftime('%Y-%m-%d')}_pooled_{a.tag.lstrip('_') or name}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {path}")
    return 0


def print_paired(title: str, r: dict) -> None:
    by = ("" if r["seeds"] == 1 else " (seeds: " + ", ".join(
        f"{x:.3f}->{y:.3f}" for x, y in zip(r["a_by_seed"], r["b_by_seed"])) + ")")
    print(f"  {title:34s} {r['a']:.3f} -> {r['b']:.3f}  {r['difference']:+.3f} "
          f"({r['difference_low']:+.3f} to {r['difference_high']:+.3f}; resolves "
          f"+-{r['resolution']:.3f}){by}", flush=True)


def run_all_oof(a, settings: dict, data: Path, png: Path, work: Path, meta: Path | None,
                t0: float) -> int:
    """--all-oof: every image of the wrap in `folds` patient-grouped folds, for each seed;
    every breast scored by best.pt and the last model of the fold that did not train on it
    (and by the frozen probe on the same folds); RUN/oof_breasts.csv and the comparisons."""
    from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
    from rsna_utils.learn.data import load_table
    folds = int(settings.get("folds") or 0)
    if folds < 2:
        raise SystemExit("--all-oof needs --folds 2 or more")
    csv = all_images(data, meta)
    table = load_table(csv, png)
    base_seed = int(settings.get("seed", 42))
    seeds = [base_seed + i for i in range(max(1, a.seeds))]
    run = work / f"oof_{settings['model']}_{settings['size']}{a.tag}"
    print(f"every breast out of fold: {len(table)} images, {table.prediction_id.nunique()} breasts "
          f"({int(table.groupby('prediction_id').cancer.max().sum())} positive), {folds} folds, "
          f"seeds {seeds}", flush=True)
    feats = None
    size = tuple(parse_size(settings["size"], MIN_MODEL_SIDE))
    if not a.skip_probe:
        feats = frozen_features(png, table, settings["model"], settings.get("pretrained_path"), size)
    cols, steps, hist_runs, cfgs = {}, {}, [], []
    for s in seeds:
        runs = []
        for k in range(folds):
            cfg = run_config(settings, data=str(png), csv=str(csv), out=str(run / f"seed{s}" / f"fold{k}"),
                             split="kfold", folds=folds, fold=k, seed=s)
            if s == seeds[0] and k == 0:
                print(f"  TrainConfig (not defaults): {changed_fields(cfg)}", flush=True)
            cfg = train_run(cfg, a.steps, table)
            cfgs.append(cfg)
            steps[f"seed{s}/fold{k}"] = steps_taken(Path(cfg.out), cfg.batch_size, cfg.accumulate)
            runs.append(Path(cfg.out))
        hist_runs += runs
        oof = oof_scores(runs, png, table, feats)
        for c in ("best", "last") + (("probe",) if feats is not None else ()):
            cols[f"{c}_s{s}"] = oof.rename(columns={c: f"{c}_s{s}"})[["image_id", f"{c}_s{s}"]]
    images = table[["image_id", "prediction_id", "patient_id", "cancer"]].reset_index(drop=True)
    for name, col in cols.items():
        images[name] = col.set_index("image_id")[name].loc[images.image_id].to_numpy()
    b = oof_breasts(images, tuple(cols))
    b.to_csv(run / "oof_breasts.csv", index=False)
    res = dict(mode="all_oof", breasts=int(len(b)), positive_breasts=int(b.cancer.sum()),
               images=int(len(table)), folds=folds, seeds=seeds, steps_taken=steps,
               train_config=changed_fields(cfgs[0]), recipe=a.recipe)
    print(f"\nout of fold, every breast ({len(b)} breasts, {int(b.cancer.sum())} positive; "
          f"{len(seeds)} seed(s)); 95% paired patient bootstrap, 'resolves' = half the interval's "
          "width:")
    y, pid = b.cancer.to_numpy(), b.patient_id.to_numpy()
    from rsna_utils.learn.metrics import roc_auc
    for c in ("best", "last", "probe"):
        if seed_columns(b, c):
            res[f"{c}_auc_by_seed"] = [float(roc_auc(y, b[k])) for k in seed_columns(b, c)]
            print(f"  {c:5s} breast AUC by seed: " + ", ".join(f"{v:.3f}" for v in res[f"{c}_auc_by_seed"]))
    if feats is not None:
        for c in ("best", "last"):
            r = paired_difference(y, b[seed_columns(b, "probe")], b[seed_columns(b, c)], pid,
                                  n_boot=a.n_boot)
            res[f"{c}_minus_probe"] = r
            print_paired(f"recipe {c} minus probe, breast AUC", r)
    r = paired_difference(y, b[seed_columns(b, "best")], b[seed_columns(b, "last")], pid, n_boot=a.n_boot)
    res["last_minus_best"] = r
    print_paired("last minus best, breast AUC", r)
    if a.versus:
        other_file = Path(a.versus) / "oof_breasts.csv"
        if not other_file.exists():
            raise SystemExit(f"{other_file}: not found; --versus with --all-oof takes the folder "
                             "of another --all-oof run (oof_<model>_<size>...)")
        other = pd.read_csv(other_file)
        res["versus"] = {"run": str(a.versus)}
        print(f"\nthis run minus {a.versus} (paired by breast and seed):")
        for c in ("best", "last"):
            for metric in ("auc", "pr_auc"):
                yy, pa, pb, pp = pair_runs(b, other, c)
                r = paired_difference(yy, pa, pb, pp, metric, n_boot=a.n_boot)
                res["versus"][f"{c}_{metric}"] = r
                print_paired(f"{c}.pt breast {metric.replace('_', '-').upper()}", r)
    res["seconds"] = round(time.perf_counter() - t0)
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    where = "" if work.resolve() == (REPO / "data" / "realdata").resolve() else f"_{work.name}"
    stem = f"realdata_{time.strftime('%Y-%m-%d')}_alloof_{settings['model']}_{settings['size']}{a.tag}{where}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    hist = run_history(hist_runs)
    curves(hist, out / f"{stem}.png", f"{settings['model']} at {settings['size']}, every breast "
           "out of fold, on real RSNA images")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, default=float))
    return 0


def run_history(runs: list[Path]) -> pd.DataFrame:
    """metrics.csv of every run folder, with `fold` (0, 1, ... in the order given) and `run` (the
    training the folder belongs to, e.g. 512x256_4fold; one name when a single training)."""
    parts = []
    for k, r in enumerate(runs):
        name = r.parent.name.removeprefix("run_").split("_", 2)[-1] if r.name.startswith("fold") else r.name
        parts.append(pd.read_csv(r / "metrics.csv").assign(fold=k, run=name))
    return pd.concat(parts)


def curves(hist: pd.DataFrame, out_png: Path, title: str) -> None:
    """Training loss and validation breast AUC / PR-AUC by epoch, side by side (one line per fold;
    with several trainings, one colour per training and the folds in its colour)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    if "run" in hist and hist.run.nunique() > 1:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4))
        colours = dict(zip(hist.run.unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for (name, _), h in hist.groupby(["run", "fold"], sort=False):
            c, first = colours[name], h.fold.iloc[0] == hist[hist.run == name].fold.min()
            ax[0].plot(h.epoch, h.train_loss, "o-", color=c, label=f"{name} training" if first else None)
            if "image_log_loss" in h and h.image_log_loss.notna().any():
                ax[0].plot(h.epoch, h.image_log_loss, "s--", color=c,
                           label=f"{name} validation" if first else None)
            ax[1].plot(h.epoch, h.breast_mean_auc, "o-", color=c, label=name if first else None)
        ax[0].set(title="loss (BCE), one line per fold: training -, validation --", xlabel="epoch")
        ax[1].set(title="validation breast AUC (held-out patients of each fold)", xlabel="epoch")
        for a in ax:
            a.legend(fontsize=7)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_png, dpi=110)
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, h in hist.groupby("fold"):
        tag = f"fold {k} " if hist.fold.nunique() > 1 else ""
        line, = ax[0].plot(h.epoch, h.train_loss, "o-", label=f"{tag}training")
        if "image_log_loss" in h and h.image_log_loss.notna().any():
            ax[0].plot(h.epoch, h.image_log_loss, "s--", color=line.get_color(),
                       label=f"{tag}validation")
        ax[1].plot(h.epoch, h.breast_mean_auc, "o-", label=f"{tag}breast AUC")
        if hist.fold.nunique() == 1:
            ax[1].plot(h.epoch, h.breast_mean_pr_auc, "s-", label="breast PR-AUC")
    ax[0].set(title="loss (BCE): training -, validation --", xlabel="epoch")
    ax[0].legend(fontsize=7)
    ax[1].set(title="validation (held-out patients of the training part)", xlabel="epoch")
    ax[1].legend(fontsize=7)
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))     # epochs are whole numbers
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)




def main(argv: list[str] | None = None) -> int:
    from rsna_utils.core.sizes import MIN_MODEL_SIDE, parse_size
    from rsna_utils.sources.realdata import check_wrapped, wrap
    a = build_parser().parse_args(argv)
    if a.pool:
        return run_pooled(a)
    if a.versus_pool:
        raise SystemExit("--versus-pool: with --pool only")
    src = a.src or find_realdata()
    if src is None:
        print("no real data: set RSNA_REALDATA or place ../shared/realdata/rsna_dev")
        return 0
    meta = None if a.meta == "none" else (Path(a.meta) if a.meta else find_meta())
    if a.meta is None and meta is None:
        print("no metadata table found ($RSNA_META, ../shared/realdata/rsna_meta): wrapping "
              "without it (sides from the pixels, no views)", flush=True)
    settings, predict_tta = train_settings(a, meta is not None)
    run_config(settings, data="x", csv="x", out="x", split="kfold", fold=0)   # checked up front
    work = Path(a.work)
    data, png = work / "dcm", work / f"png{a.png_size}"
    t0 = time.perf_counter()
    if not check_wrapped(data):     # an older wrap is refused: its PNGs would be reused
        print(wrap(src, data, test_frac=0.25, seed=0, limit=a.limit, meta=meta), flush=True)
    wrapped = json.loads((data / "wrap.json").read_text())
    if (wrapped.get("metadata") is None) != (meta is None):
        raise SystemExit(f"{data} was wrapped {'without' if wrapped.get('metadata') is None else 'with'} "
                         f"a metadata table, this run asks {'none' if meta is None else meta}: "
                         "give another --work folder")
    rsna("preprocess", "--images", str(data / "train_images"), "--csv", str(data / "train.csv"),
         "--out", str(png), "--size", a.png_size, "--workers", "2", "--quiet")
    rsna("preprocess", "--images", str(data / "test_images"), "--csv", str(data / "test.csv"),
         "--out", str(png), "--size", a.png_size, "--workers", "2", "--quiet")
    if a.all_oof:
        return run_all_oof(a, settings, data, png, work, meta, t0)
    if a.seeds != 1:
        raise SystemExit("--seeds: with --all-oof only")
    model, size_text = settings["model"], settings["size"]
    run = work / f"run_{model}_{size_text}{a.tag}"
    folds = int(settings.get("folds") or 0)
    per_run = dict(data=str(png), csv=str(data / "train.csv"))
    if folds:
        runs = [run / f"fold{k}" for k in range(folds)]
        others = [r for w in a.with_runs or [] for r in sorted(Path(w).glob("fold*"))]
        for r in others:
            other = json.loads((r / "config.json").read_text()).get("tta", False)
            if other != settings["tta"]:    # one OOF threshold needs one kind of score
                raise SystemExit(f"{r} validated with tta={other}, this run asks "
                                 f"tta={settings['tta']}; pair runs that validated alike")
        cfgs = [run_config(settings, **per_run, out=str(r), split="kfold", folds=folds, fold=k)
                for k, r in enumerate(runs)]
        print(f"  TrainConfig (not defaults): {changed_fields(cfgs[0])}", flush=True)
        cfgs = [train_run(c, a.steps) for c in cfgs]
        # the threshold for the exact ensemble that is scored, tuned on its out-of-fold predictions
        from rsna_utils.infer.oof import write_ensemble
        out_dir = run
        alone = None
        if a.with_runs:
            alone = _held_out_alone(runs, data, run, predict_tta)
            runs += others
            names = [Path(w).name.removeprefix("run_") for w in a.with_runs]
            out_dir = run / ("with_" + "+".join(names))
            a.tag += "".join(f"+{n}" for n in names)
        ens = write_ensemble(runs, out_dir / "ensemble.json")
    else:
        cfgs = [train_run(run_config(settings, **per_run, out=str(run)), a.steps)]
        print(f"  TrainConfig (not defaults): {changed_fields(cfgs[0])}", flush=True)
        runs, out_dir = [run], run
        ens = alone = None
    steps = {Path(c.out).name: steps_taken(Path(c.out), c.batch_size, c.accumulate) for c in cfgs}
    # what `rsna predict --labels` runs, in-process to keep the per-image scores
    from rsna_utils.infer.predict import predict
    imgs = pd.read_csv(data / "test.csv")
    r = predict(data / "test_images", data / "test.csv", [r / "best.pt" for r in runs], out_dir / "submission.csv",
                labels=data / "test_labels.csv", workers=2, progress=False, tta=predict_tta)
    m = r.metrics
    held = held_out_breasts(r.images, data)
    if ens is not None:         # the binarised submission at the OOF cuts, on new patients
        from rsna_utils.infer.predict import binarize
        from rsna_utils.learn.metrics import pfbeta
        held["call_threshold"] = (held.prediction >= ens["threshold"]).astype(float)
        held["call_quantile"] = binarize(held.prediction.to_numpy(), f"quantile:{ens['quantile']!r}",
                                        ens["threshold"])
        for how in ("threshold", "quantile"):
            m[f"breast_pf1_at_oof_{how}"] = float(pfbeta(held.cancer.to_numpy(),
                                                         held[f"call_{how}"].to_numpy()))
    held.to_csv(out_dir / "held_out_breasts.csv", index=False)
    versus_run = paired_versus(out_dir, Path(a.versus)) if a.versus else None
    size = tuple(parse_size(size_text, MIN_MODEL_SIDE))
    probe, versus, oof_vs = {}, None, None
    if not a.skip_probe:
        probe, probe_images, train_part = frozen_probe(png, data, model,
                                                       settings.get("pretrained_path"), size)
        # paired patient bootstrap of the breast AUC difference, on the breasts both scored
        from rsna_utils.learn.metrics import breast_level
        from rsna_utils.reports.evaluate import compare_auc
        lab = pd.read_csv(data / "test_labels.csv")[["image_id", "cancer"]]
        ours = breast_level(r.images.drop(columns="cancer", errors="ignore").merge(lab, on="image_id")
                            .dropna(subset=["prediction"]))
        both = ours.merge(breast_level(probe_images), on="prediction_id", suffixes=("", "_probe"))
        both["patient_id"] = both.prediction_id.str.rsplit("_", n=1).str[0]
        versus = compare_auc(both.cancer, both.prediction_probe, both.prediction, both.patient_id)
        versus["breasts"] = int(len(both))
        if folds:   # the training part out-of-fold: three times the breasts of the test set
            oof_vs = oof_versus_probe(runs, png, train_part)
    hist = run_history(runs)
    out = dict(date=time.strftime("%Y-%m-%d"), model=model, size=size_text, tta=predict_tta,
               train_config=changed_fields(cfgs[0]), steps_taken=steps,
               epochs=cfgs[0].epochs, train_images=int(len(pd.read_csv(data / "train.csv"))),
               test_images=int(len(imgs)), test_breast_auc=m["breast_mean_auc"],
               test_breast_pr_auc=m["breast_mean_pr_auc"], test_image_auc=m["image_auc"],
               test_breast_best_f1=m["breast_mean_best_f1"], probe=probe,
               test_breast_pf1_at_oof_threshold=m.get("breast_pf1_at_oof_threshold"),
               test_breast_pf1_at_oof_quantile=m.get("breast_pf1_at_oof_quantile"),
               recipe=a.recipe, metadata=None if meta is None else str(meta),
               versus=versus_run,
               recipe_minus_probe_breast_auc=versus,
               out_of_fold_recipe_minus_probe=oof_vs,
               folds=folds, level=cfgs[0].level,
               val_auc_by_epoch=[[round(float(v), 4) for v in h.breast_mean_auc] for _, h in hist.groupby("fold")],
               train_loss_by_epoch=[[round(float(v), 4) for v in h.train_loss] for _, h in hist.groupby("fold")],
               oof_threshold_without_tta=bool(predict_tta and ens is not None and not ens.get("tta")),
               this_run_alone=alone,
               oof=None if ens is None else {k: ens.get(k) for k in ("auc", "pr_auc", "threshold", "quantile", "pf1", "n_images", "n_breasts")},
               seconds=round(time.perf_counter() - t0))
    res = REPO / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    # another --work folder (another wrap) names its results apart, so no earlier run's are replaced
    where = "" if work.resolve() == (REPO / "data" / "realdata").resolve() else f"_{work.name}"
    stem = f"realdata_{out['date']}_{model}_{size_text}{a.tag}{where}"
    (res / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    level = cfgs[0].level
    curves(hist, res / f"{stem}.png",
           f"{model} ({settings.get('pretrained_path')}) at {size_text}"
           f"{', breast level' if level == 'breast' else ''} on real RSNA images")
    print("\n| recipe | held-out breast AUC | breast PR-AUC | image AUC |\n|---|---|---|---|")
    if probe:
        print(f"| frozen {model} features + logistic regression | {probe['breast_auc']:.3f} | "
              f"{probe['breast_pr_auc']:.3f} | {probe['image_auc']:.3f} |")
    what = f"{folds}-fold ensemble, " if folds else ""
    print(f"| fine-tuned {model} ({settings.get('pretrained_path')}) {what}{size_text}, "
          f"{cfgs[0].epochs} epochs | {m['breast_mean_auc']:.3f} | "
          f"{m['breast_mean_pr_auc']:.3f} | {m['image_auc']:.3f} |")
    print(f"optimiser steps taken: {steps}")
    if versus:
        print(f"\nbreast AUC, recipe minus probe: {versus['difference']:+.3f} (95% paired patient-bootstrap "
              f"interval {versus['difference_low']:+.3f} to {versus['difference_high']:+.3f}; the recipe "
              f"does not beat the probe in {100 * versus['p_not_better']:.1f}% of resamples)")
    for which, v in (oof_vs or {}).items():
        if isinstance(v, dict):
            print(f"out-of-fold ({oof_vs['breasts']} breasts of the training part, {which}.pt): probe "
                  f"{v['auc_a']:.3f}, recipe {v['auc_b']:.3f}, difference {v['difference']:+.3f} "
                  f"({v['difference_low']:+.3f} to {v['difference_high']:+.3f}; not better in "
                  f"{100 * v['p_not_better']:.1f}% of resamples)")
    if versus_run:
        print(f"\nthis run minus {a.versus} (paired patient bootstrap, 95% interval; 'resolves': "
              "half its width):")
        for part, rows in versus_run.items():
            if isinstance(rows, dict):
                for k, v in rows.items():
                    print(f"  {part:9s} {k:24s} {v['a']:.3f} -> {v['b']:.3f}  {v['difference']:+.3f} "
                          f"({v['difference_low']:+.3f} to {v['difference_high']:+.3f}; resolves "
                          f"+-{(v['difference_high'] - v['difference_low']) / 2:.3f})")
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
