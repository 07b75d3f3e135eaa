"""Real-data learning benchmark (issue 11): do real RSNA mammograms learn?

`../shared/realdata/rsna_dev` (or $RSNA_REALDATA: 1,727 real RSNA images exported as 8-bit
JPEGs, 574 with cancer) is wrapped as an RSNA-shaped DICOM dataset (`rsna_utils.sources.realdata`), a
quarter of the patients held out as the test set, then the same commands a user runs:

    rsna preprocess -> rsna train -> rsna predict --labels test_labels.csv

and, on the same PNGs and the same split, the baseline the issue names: a logistic regression on
the frozen ImageNet features of the same backbone (global average pool). Prints a table and writes
`benchmarks/results/realdata_<date>.json` and the training curves as a PNG.

    python benchmarks/realdata.py [--size 384x192] [--epochs 4] [--folds 4] [--global-pool avg]

The defaults are the recipe BENCHMARKS.md records for this CPU (a 4-fold ensemble of Lite0 from
its ImageNet weights, 384x192, 4 epochs, flip TTA; about 45 min on 2 cores); `--folds 0` trains
one holdout run instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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


# The balance and regularisation of the kaggle plan, scaled to this CPU: `old` is the plan before
# issue 30 (upsample 5 + pos_weight 5, weight decay 1e-4 on everything, one epoch's AUC picks
# best.pt), `new` the plan after it (1st place: a 1:7 sampler, one positive per batch, no loss
# weight; decoupled weight decay 1e-2 off norms and biases, EMA over half an epoch, stochastic
# depth, best.pt by the mean breast AUC of the last two epochs).
RECIPES = {
    "old": dict(upsample="5", target_ratio="none", min_positives="1", pos_weight="5",
                weight_decay="1e-4", ema_epochs="0", drop_path="0", select_window="1"),
    "new": dict(upsample="1", target_ratio="1:7", min_positives="1", pos_weight="1",
                weight_decay="1e-2", ema_epochs="0.5", drop_path="0.1", select_window="2"),
}
# the kaggle plan's auxiliary targets (2nd place: x0.1 heads); only with the metadata
AUX = "BIRADS,density,view,difficult_negative_case,invasive,age"


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

    from rsna_utils.infer.predict import batch_input, load_models
    from rsna_utils.learn.checkpoint import cancer_logit
    (m,), _ = load_models([ckpt], torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for i in range(0, len(val), 32):
            x = batch_input([cv2.imread(str(png / f"{r.patient_id}_{r.image_id}.png"), cv2.IMREAD_UNCHANGED)
                             for r in val.iloc[i:i + 32].itertuples()], m, m.channels, m.size)
            if m.level == "breast":        # each view's features; the breasts pooled below
                from rsna_utils.infer.predict import view_features
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
    (last.pt; no choice made on the scored patients). Runs of one fold (two models) are averaged,
    as the ensemble is."""
    from rsna_utils.learn.metrics import breast_level
    from rsna_utils.reports.evaluate import compare_auc
    tr, feats = train_part          # the training part's images and their frozen features
    tr = tr.reset_index(drop=True)
    by_fold: dict[int, list[tuple[Path, dict]]] = {}
    for run in runs:                # with --with-runs: two models per fold, their scores averaged
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
            is_val = tr.image_id.isin(val_ids).to_numpy()
            val = tr[is_val]
            pred = pd.read_csv(run / "val_predictions.csv").set_index("image_id").prediction
            if len(pred) != len(val) or not pred.index.isin(val.image_id).all():
                raise SystemExit(f"{run}: val_predictions.csv does not hold its fold's "
                                 f"{len(val)} validation images")
            best.append(pred.loc[val.image_id].to_numpy())
            last.append(_fold_predictions(run / "last.pt", val, png, bool(cfg.get("tta", False))))
        if seen & val_ids:
            raise SystemExit(f"fold {k} shares validation images with another fold")
        seen |= val_ids
        probe = _probe().fit(feats[~is_val], tr.cancer[~is_val]).predict_proba(feats[is_val])[:, 1]
        parts.append(val.assign(probe=probe, best=np.mean(best, 0), last=np.mean(last, 0)))
        print(f"  fold {k}: {len(val)} validation images scored by the probe and "
              f"{len(members)} last.pt", flush=True)
    oof = pd.concat(parts)
    if seen != set(tr.image_id):
        raise SystemExit(f"the folds' validation sets cover {len(seen)} of {len(tr)} training images")
    b = pd.concat([breast_level(oof, c).set_index("prediction_id")[[c] + (["cancer"] if c == "probe" else [])]
                   for c in ("probe", "best", "last")], axis=1).reset_index()
    b["patient_id"] = b.prediction_id.str.rsplit("_", n=1).str[0]
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


def _fold_state(run: Path, want: dict) -> str:
    """'new', 'partial' (resume it) or 'done' (reuse it): a fold folder is reused only when its
    config.json is the recipe asked for; otherwise stop rather than score other checkpoints."""
    cfg_file = run / "config.json"
    if not cfg_file.exists():
        return "new"
    cfg = json.loads(cfg_file.read_text())
    cfg.setdefault("backbone_lr", 1.0)          # runs from before the option had one group
    cfg.setdefault("tta", False)                # ... and validated without the flip
    cfg.setdefault("drop_path", 0.0)            # ... and without stochastic depth
    cfg.setdefault("ema_epochs", 0.0)           # ... and issue 30's settings
    cfg.setdefault("select_window", 1)
    cfg.setdefault("level", "image")            # ... and issue 31's breast-level model
    differ = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
    if differ:
        raise SystemExit(f"{run} was trained with other settings ({differ}, as (there, asked)); "
                         "give another --tag or delete the folder")
    m = run / "metrics.csv"
    done = (run / "best.pt").exists() and m.exists() and len(pd.read_csv(m)) >= want["epochs"]
    return "done" if done else "partial"


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


def main() -> int:
    from rsna_utils.sources.realdata import check_wrapped, wrap
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=None, help="the export's folder (benign/, malignant/); "
                    "default $RSNA_REALDATA or ../shared/realdata/rsna_dev")
    ap.add_argument("--meta", default=None, help="the competition's train.csv for those images "
                    "(default $RSNA_META or ../shared/realdata/rsna_meta/train_folds.csv; none: "
                    "wrap without it, sides from the pixels, no views)")
    ap.add_argument("--recipe", default="new", choices=tuple(RECIPES),
                    help="balance and regularisation: new (the kaggle plan's) or old (before "
                         "issue 30); flags below override its parts")
    ap.add_argument("--aux", default=None, help=f"auxiliary targets (default with metadata: "
                    f"{AUX}; none: off)")
    ap.add_argument("--versus", default=None, help="another run folder of this script (same "
                    "--work): paired patient-bootstrap differences, this run minus that one")
    ap.add_argument("--work", default=str(REPO / "data" / "realdata"))
    ap.add_argument("--size", default="384x192")
    ap.add_argument("--png-size", default="640x320")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="pypi")
    ap.add_argument("--lr", default="3e-4")
    ap.add_argument("--backbone-lr", default="1", help="backbone lr as a share of --lr")
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--limit", type=int, default=None, help="wrap only about this many images")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                    help="predict with the horizontal flip too (--no-tta: without)")
    ap.add_argument("--val-tta", default=None, choices=("true", "false"),
                    help="validate the folds with the flip (default: as --tta)")
    ap.add_argument("--ema", default="0", help="fixed EMA decay of the weights (0: off; the "
                    "recipe's --ema-epochs otherwise)")
    for k in RECIPES["new"]:
        ap.add_argument("--" + k.replace("_", "-"), default=None, help=f"the recipe's {k}")
    ap.add_argument("--random-crop", default="0", help="augmentation: crop up to this share")
    ap.add_argument("--tag", default="", help="suffix of the run folder and result files")
    ap.add_argument("--folds", type=int, default=4,
                    help="train this many folds (--split kfold) and predict with their ensemble; "
                         "0: one holdout run")
    ap.add_argument("--global-pool", default="avg")
    ap.add_argument("--level", default="image", choices=("image", "breast"),
                    help="image: each view scored alone, the views averaged; breast: both views "
                         "of a breast through one backbone, attention-pooled. At equal budget: a "
                         "breast batch holds half --batch-size breasts (the same views per step) "
                         "and an epoch reads each view once either way")
    ap.add_argument("--with-runs", nargs="+", default=None,
                    help="with --folds: folders of fold*/ runs of other models (e.g. another "
                         "size) to ensemble with; outputs go to RUN/with_<their names>; this "
                         "run alone is also scored on the held-out patients")
    a = ap.parse_args()
    a.val_tta = a.tta if a.val_tta is None else a.val_tta == "true"
    for k, v in RECIPES[a.recipe].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if float(a.ema) and float(a.ema_epochs):
        a.ema_epochs = "0"                      # a fixed --ema replaces the recipe's
    src = a.src or find_realdata()
    if src is None:
        print("no real data: set RSNA_REALDATA or place ../shared/realdata/rsna_dev")
        return 0
    meta = None if a.meta == "none" else (Path(a.meta) if a.meta else find_meta())
    if a.meta is None and meta is None:
        print("no metadata table found ($RSNA_META, ../shared/realdata/rsna_meta): wrapping "
              "without it (sides from the pixels, no views)", flush=True)
    if a.aux is None:
        a.aux = AUX if meta is not None else "none"
    if a.level == "breast":     # 'view' is per image; a breast reads both
        a.aux = ",".join(x for x in a.aux.split(",") if x != "view") or "none"
        a.batch_size = str(max(2, int(a.batch_size) // 2))
    work = Path(a.work)
    data, png, run = (work / "dcm", work / f"png{a.png_size}",
                      work / f"run_{a.model}_{a.size}{a.tag}")
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
    common = ["--data", str(png), "--csv", str(data / "train.csv"), "--model", a.model,
              "--pretrained-path", a.pretrained, "--size", a.size, "--epochs", str(a.epochs),
              "--batch-size", a.batch_size, "--lr", a.lr, "--backbone-lr", a.backbone_lr,
              *[x for k in RECIPES["new"] for x in ("--" + k.replace("_", "-"), getattr(a, k))],
              "--augment", "true", "--workers", "2", "--quiet", "--ema", a.ema,
              "--random-crop", a.random_crop,
              *(["--aux", a.aux] if a.aux != "none" else []),
              "--global-pool", a.global_pool, "--tta", str(a.val_tta).lower(), "--level", a.level]
    if a.folds:
        runs = [run / f"fold{k}" for k in range(a.folds)]
        others = [r for w in a.with_runs or [] for r in sorted(Path(w).glob("fold*"))]
        for r in others:
            other = json.loads((r / "config.json").read_text()).get("tta", False)
            if other != a.val_tta:    # one OOF threshold needs one kind of score (before training)
                raise SystemExit(f"{r} validated with tta={other}, this run asks tta={a.val_tta}; "
                                 "pair runs that validated alike")
        for k, r in enumerate(runs):
            want = dict(model=a.model, size=[int(v) for v in a.size.split("x")], epochs=a.epochs,
                        lr=float(a.lr), backbone_lr=float(a.backbone_lr), ema=float(a.ema), global_pool=a.global_pool,
                        drop_path=float(a.drop_path), random_crop=float(a.random_crop),
                        upsample=float(a.upsample), pos_weight=float(a.pos_weight),
                        min_positives=int(a.min_positives), weight_decay=float(a.weight_decay),
                        ema_epochs=float(a.ema_epochs), select_window=int(a.select_window),
                        aux=[x for x in a.aux.split(",") if x and a.aux != "none"],
                        batch_size=int(a.batch_size), split="kfold", folds=a.folds, fold=k,
                        pretrained_path=a.pretrained, tta=a.val_tta, level=a.level)
            state = _fold_state(r, want)
            if state != "done":       # an interrupted fold continues from its last.pt
                rsna("train", *common, "--out", str(r), "--split", "kfold", "--folds", str(a.folds),
                     "--fold", str(k), *(["--resume"] if state == "partial" else []))
        # the threshold for the exact ensemble that is scored, tuned on its out-of-fold predictions
        from rsna_utils.infer.oof import write_ensemble
        out_dir = run
        alone = None
        if a.with_runs:
            alone = _held_out_alone(runs, data, run, a.tta)
            runs += others
            names = [Path(w).name.removeprefix("run_") for w in a.with_runs]
            out_dir = run / ("with_" + "+".join(names))
            a.tag += "".join(f"+{n}" for n in names)
        # with --tta the folds validate with the flip too, so the OOF threshold fits the
        # flip-averaged held-out scores (runs made before TrainConfig.tta did not)
        ens = write_ensemble(runs, out_dir / "ensemble.json")
    else:
        runs, out_dir = [run], run
        rsna("train", *common, "--out", str(run))
        ens = alone = None
    # what `rsna predict --labels` runs, in-process to keep the per-image scores
    from rsna_utils.infer.predict import predict
    imgs = pd.read_csv(data / "test.csv")
    r = predict(data / "test_images", data / "test.csv", [r / "best.pt" for r in runs], out_dir / "submission.csv",
                labels=data / "test_labels.csv", workers=2, progress=False, tta=a.tta)
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
    size = tuple(int(v) for v in a.size.split("x"))
    probe, versus, oof_vs = {}, None, None
    if not a.skip_probe:
        probe, probe_images, train_part = frozen_probe(png, data, a.model, a.pretrained, size)
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
        if a.folds and float(a.ema):   # last.pt's "model" is the live network, not the EMA
            print("out-of-fold comparison skipped: with --ema the last epoch's scored weights are "
                  "the average, which last.pt keeps apart from the model")
        elif a.folds:   # the training part out-of-fold: three times the breasts of the test set
            oof_vs = oof_versus_probe(runs, png, train_part)
    hist = run_history(runs)
    out = dict(date=time.strftime("%Y-%m-%d"), model=a.model, pretrained=a.pretrained, size=a.size, tta=a.tta,
               ema=a.ema, lr=a.lr, backbone_lr=a.backbone_lr,
               epochs=a.epochs, train_images=int(len(pd.read_csv(data / "train.csv"))),
               test_images=int(len(imgs)), test_breast_auc=m["breast_mean_auc"],
               test_breast_pr_auc=m["breast_mean_pr_auc"], test_image_auc=m["image_auc"],
               test_breast_best_f1=m["breast_mean_best_f1"], probe=probe,
               test_breast_pf1_at_oof_threshold=m.get("breast_pf1_at_oof_threshold"),
               test_breast_pf1_at_oof_quantile=m.get("breast_pf1_at_oof_quantile"),
               recipe=a.recipe, metadata=None if meta is None else str(meta), aux=a.aux,
               **{k: getattr(a, k) for k in RECIPES["new"]},
               versus=versus_run,
               recipe_minus_probe_breast_auc=versus,
               out_of_fold_recipe_minus_probe=oof_vs,
               folds=a.folds, global_pool=a.global_pool, level=a.level, batch_size=a.batch_size,
               val_auc_by_epoch=[[round(float(v), 4) for v in h.breast_mean_auc] for _, h in hist.groupby("fold")],
               train_loss_by_epoch=[[round(float(v), 4) for v in h.train_loss] for _, h in hist.groupby("fold")],
               oof_threshold_without_tta=bool(a.tta and ens is not None and not ens.get("tta")),
               this_run_alone=alone,
               oof=None if ens is None else {k: ens.get(k) for k in ("auc", "pr_auc", "threshold", "quantile", "pf1", "n_images", "n_breasts")},
               seconds=round(time.perf_counter() - t0))
    res = REPO / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    # another --work folder (another wrap) names its results apart, so no earlier run's are replaced
    where = "" if work.resolve() == (REPO / "data" / "realdata").resolve() else f"_{work.name}"
    stem = f"realdata_{out['date']}_{a.model}_{a.size}{a.tag}{where}"
    (res / f"{stem}.json").write_text(json.dumps(out, indent=1))
    curves(hist, res / f"{stem}.png",
           f"{a.model} ({a.pretrained}) at {a.size}{', breast level' if a.level == 'breast' else ''}"
           " on real RSNA images")
    print("\n| recipe | held-out breast AUC | breast PR-AUC | image AUC |\n|---|---|---|---|")
    if probe:
        print(f"| frozen {a.model} features + logistic regression | {probe['breast_auc']:.3f} | "
              f"{probe['breast_pr_auc']:.3f} | {probe['image_auc']:.3f} |")
    what = f"{a.folds}-fold ensemble, " if a.folds else ""
    print(f"| fine-tuned {a.model} ({a.pretrained}) {what}{a.size}, {a.epochs} epochs | {m['breast_mean_auc']:.3f} | "
          f"{m['breast_mean_pr_auc']:.3f} | {m['image_auc']:.3f} |")
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
        print(f"\nthis run minus {a.versus} (paired patient bootstrap, 95% interval):")
        for part, rows in versus_run.items():
            if isinstance(rows, dict):
                for k, v in rows.items():
                    print(f"  {part:9s} {k:24s} {v['a']:.3f} -> {v['b']:.3f}  {v['difference']:+.3f} "
                          f"({v['difference_low']:+.3f} to {v['difference_high']:+.3f})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
