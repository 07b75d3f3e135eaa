"""Figures for the notebooks: each function takes data and returns a matplotlib Figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib.pyplot as plt  # inline in Jupyter, Agg when headless
    return plt


def class_balance(train: pd.DataFrame):
    """Positive share at image, breast and patient level."""
    plt = _plt()
    levels = {
        "image": train["cancer"],
        "breast": train.groupby(["patient_id", "laterality"]).cancer.max(),
        "patient": train.groupby("patient_id").cancer.max(),
    }
    fig, ax = plt.subplots(figsize=(6, 3))
    shares = [v.mean() * 100 for v in levels.values()]
    ax.bar(list(levels), shares, color="tab:red")
    ax.set_xlabel("level")
    for i, (k, v) in enumerate(levels.items()):
        ax.text(i, shares[i], f"{int(v.sum())}/{len(v)}", ha="center", va="bottom")
    ax.set_ylabel("% positive")
    ax.set_title("Class balance")
    fig.tight_layout()
    return fig


def positives_by(train: pd.DataFrame, columns=("site_id", "machine_id", "density", "BIRADS",
                                               "implant", "view", "laterality"), ncols: int = 4):
    """Image count and positive rate for each value of each column (NaN shown as 'missing'),
    one panel per column on a grid of `ncols` columns (seven panels in a row are too thin to
    read)."""
    plt = _plt()
    cols = [c for c in columns if c in train]
    ncols = max(1, min(ncols, len(cols)))
    nrows = max(1, int(np.ceil(len(cols) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.1 * nrows), squeeze=False)
    for ax in axes.ravel()[len(cols):]:
        ax.axis("off")
    for ax, c in zip(axes.ravel(), cols):
        g = train.assign(**{c: _category_names(train[c])}).groupby(c).cancer
        size, rate = g.size(), g.mean()
        order = sorted(size.index, key=_category_key)
        size, rate = size[order], rate[order]
        x = np.arange(len(size))
        ax.bar(x - 0.2, size.values, width=0.4, color="lightgray", label="images")
        ax2 = ax.twinx()            # categories, not a sequence: bars side by side, no line
        ax2.bar(x + 0.2, rate.values * 100, width=0.4, color="tab:red", label="% positive")
        ax.set_xticks(x, list(size.index), rotation=45 if len(x) > 4 else 0,
                      ha="right" if len(x) > 4 else "center", fontsize=8 if len(x) > 8 else 10)
        ax.set_title(c)
        ax.set_ylabel("images")
        ax2.set_ylabel("% positive", color="tab:red")
    fig.tight_layout()
    return fig


def _category_names(values: pd.Series) -> pd.Series:
    """A column's values as tick labels: 2.0 (an integer column with NaN) as 2, NaN as
    'missing'."""
    def name(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "missing"
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)
    return values.map(name)


def _category_key(name: str):
    """Numbers in numeric order (machine 21 before 170), then words, 'missing' last."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (2 if name == "missing" else 1, 0.0, name)


def age_histogram(train: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(train.loc[train.cancer == 0, "age"].dropna(), bins=30, alpha=0.6, density=True, label="negative")
    ax.hist(train.loc[train.cancer == 1, "age"].dropna(), bins=30, alpha=0.6, density=True, label="positive")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("share of images")
    ax.legend()
    fig.tight_layout()
    return fig


def header_summary(headers: pd.DataFrame):
    """Bar charts of transfer syntax, photometric interpretation, VOI LUT function; a scatter of
    image sizes (from `rsna_utils.reports.eda.scan_headers`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6), width_ratios=[1.6, 1, 1, 1.1])
    titles = {"transfer_syntax": "transfer syntax", "photometric": "photometric interpretation",
              "voi_function": "VOI LUT function"}
    for ax, c in zip(axes[:3], titles):
        vc = headers[c].fillna("absent").value_counts()
        # the syntax's name, not its UID (the UID is cut off otherwise), wrapped to two lines
        names = [_wrap_label(str(i).split(" (1.2.840")[0]) for i in vc.index]
        ax.barh(names, vc.values)
        ax.set_title(titles[c])
        ax.set_xlabel("images")
    sizes = headers.groupby(["rows", "columns"]).size().reset_index(name="n")
    axes[3].scatter(sizes["columns"], sizes["rows"], s=20 + sizes["n"], alpha=0.6)
    axes[3].set_xlabel("columns")
    axes[3].set_ylabel("rows")
    axes[3].set_title("image sizes")
    fig.tight_layout()
    return fig


def _wrap_label(text: str, width: int = 22) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)[:2])


def image_grid(images: list[np.ndarray], titles: list[str], cols: int = 6, size: float = 2.2):
    plt = _plt()
    rows = int(np.ceil(len(images) / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.25))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, t in zip(np.atleast_1d(axes).ravel(), images, titles):
        ax.imshow(img, cmap="gray")
        ax.set_title(t, fontsize=8)
    fig.tight_layout()
    return fig


def pipeline_steps(steps: dict):
    """One image through every step, side by side (`rsna_utils.image.walkthrough.explain_image`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3.6))
    for ax, (name, (img, note)) in zip(np.atleast_1d(axes), steps.items()):
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{name}\n{note}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


CURVE_NAMES = {"image_auc": "per image", "breast_mean_auc": "per breast (mean of views)",
               "image_pf1": "pF1 (probabilities) per image",
               "breast_mean_pf1": "pF1 (probabilities) per breast",
               "breast_mean_best_f1": "F1 per breast at its best threshold"}
# each curve its own marker and line: a curve that equals another stays visible beside it
CURVE_STYLES = {"image_auc": dict(marker="o", ls="-"),
                "breast_mean_auc": dict(marker="s", ls="--", mfc="none", ms=9),
                "image_pf1": dict(marker="o", ls="-"),
                "breast_mean_pf1": dict(marker="s", ls="--", mfc="none", ms=9),
                "breast_mean_best_f1": dict(marker="^", ls=":")}


def _same_as(metrics: pd.DataFrame, c: str, before: list[str]) -> str | None:
    """The name of an earlier curve that `c` equals at every epoch (then drawn on top of it)."""
    for b in before:
        x, y = metrics[b].to_numpy(float), metrics[c].to_numpy(float)
        if len(x) and np.allclose(x, y, equal_nan=True):
            return CURVE_NAMES[b]
    return None


def _legend_below(ax) -> None:
    """The legend under the axes, where it covers no curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, frameon=False)


def learning_curves(metrics: pd.DataFrame):
    """Loss, validation AUC and F1 by epoch (on the run's validation patients), each curve
    with its own marker and line style and the legends under the axes: a breast-level model
    scores every view of a breast alike, so its per-image and per-breast curves coincide, and
    the legend says so."""
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    axes[0].plot(metrics.epoch, metrics.train_loss, "o-", label="training (weighted BCE)")
    if "image_log_loss" in metrics:        # runs before this column: training loss only
        axes[0].plot(metrics.epoch, metrics.image_log_loss, "s--", mfc="none", ms=9,
                     label="validation (BCE)")
    axes[0].set_title("loss")
    for ax, cols, title in ((axes[1], ("image_auc", "breast_mean_auc"), "validation ROC AUC"),
                            (axes[2], ("image_pf1", "breast_mean_pf1", "breast_mean_best_f1"),
                             "validation F1")):
        drawn = []
        for c in cols:
            if c not in metrics:
                continue
            same = _same_as(metrics, c, drawn)
            ax.plot(metrics.epoch, metrics[c], **CURVE_STYLES[c],
                    label=CURVE_NAMES[c] + (" (equals the curve above)" if same else ""))
            drawn.append(c)
        ax.set_title(title + "\n(validation patients)")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("AUC")
    axes[2].set_ylabel("F1")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # whole epochs
        _legend_below(ax)
    fig.tight_layout()
    return fig


def roc_pr_confusion(preds: pd.DataFrame, threshold: float, level: str = "breast",
                     on: str = "validation patients"):
    """ROC and PR curves and the confusion matrix at `threshold` (breast level: mean of views);
    every title says whose predictions they are (`on`)."""
    from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

    from rsna_utils.learn.metrics import breast_level
    plt = _plt()
    d = breast_level(preds) if level == "breast" else preds
    y, p = d["cancer"].to_numpy(), d["prediction"].to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if len(np.unique(y)) > 1:
        fpr, tpr, _ = roc_curve(y, p)
        axes[0].plot(fpr, tpr)
        pr, rc, _ = precision_recall_curve(y, p)
        axes[1].plot(rc, pr)
    axes[0].plot([0, 1], [0, 1], "--", color="gray")
    who = f"{on}: {len(y)} {level}s, {int(np.sum(y))} with cancer"
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate",
                title=f"ROC ({level})\n{who}")
    axes[1].set(xlabel="recall", ylabel="precision", title=f"PR ({level})\n{who}")
    cm = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1])
    axes[2].imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        axes[2].text(j, i, str(v), ha="center", va="center", fontsize=14,
                     color="white" if v > cm.max() / 2 else "black")
    axes[2].set(xticks=[0, 1], yticks=[0, 1], xticklabels=["no cancer", "cancer"],
                yticklabels=["no cancer", "cancer"], xlabel="predicted", ylabel="true",
                title=f"confusion at {threshold:.3f}\n{on}")
    fig.tight_layout()
    return fig


def score_distribution(sub: pd.DataFrame, images: pd.DataFrame | None = None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(sub["cancer"], bins=40, alpha=0.7, label="breasts: the submitted value")
    if images is not None:
        ax.hist(images["prediction"].dropna(), bins=40, alpha=0.5,
                label="images: predicted probability")
    ax.set_xlabel("predicted probability of cancer (or 0 / 1 when binarised)")
    ax.set_ylabel("count (log scale)")
    ax.set_title("the submission: test patients" + (" (held out: never trained or tuned on)"
                                                     if images is not None else ""))
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")


def timing_histogram(png_dir: str | Path):
    """Per-image decode and total time from meta.csv, by transfer syntax."""
    plt = _plt()
    meta = pd.concat([pd.read_csv(p) for p in Path(png_dir).glob("meta*.csv")])
    fig, ax = plt.subplots(figsize=(7, 3))
    for ts, d in meta.groupby("transfer_syntax"):
        ax.hist(d["total_ms"], bins=30, alpha=0.5, label=f"{ts} total")
    ax.set_xlabel("ms per image (one process)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    """Free a figure that was saved (a report makes many)."""
    _plt().close(fig)


def _ci(h: dict, k: str) -> str:
    return f"{h[k]:.3f} [{h[k + '_low']:.3f}, {h[k + '_high']:.3f}]"


def _population(headline: dict) -> str:
    """"out-of-fold training patients: 28 breasts, 5 with cancer" from an evaluation's headline."""
    who = headline.get("population") or "labelled patients"
    n, k = headline.get("n"), headline.get("n_positives")
    return f"{who}: {n} breasts, {k} with cancer" if n is not None and k is not None else who


def roc_pr_bands(roc: pd.DataFrame, pr: pd.DataFrame, headline: dict):
    """ROC and PR curves with their bootstrap bands (`evaluate.evaluate_predictions`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    axes[0].fill_between(roc.fpr, roc.tpr_low, roc.tpr_high, alpha=0.25, label="95% CI")
    axes[0].plot(roc.fpr, roc.tpr, label=f"AUC {_ci(headline, 'auc')}")
    axes[0].plot([0, 1], [0, 1], "--", color="gray")
    s, t = headline.get("sensitivity"), headline.get("specificity")
    if s is not None and t is not None:
        axes[0].plot([1 - t], [s], "o", color="tab:red",
                     label=f"the cut {headline['threshold']:.3g}: sensitivity {s:.2f}, "
                     f"specificity {t:.2f}")
    who = _population(headline)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate",
                title=f"ROC (breast)\n{who}")
    axes[1].fill_between(pr.recall, pr.precision_low, pr.precision_high, alpha=0.25, label="95% CI")
    axes[1].plot(pr.recall, pr.precision, label=f"AP {_ci(headline, 'pr_auc')}")
    axes[1].axhline(headline.get("prevalence", 0), ls="--", color="gray", label="prevalence")
    axes[1].set(xlabel="recall", ylabel="precision (interpolated)", title=f"PR (breast)\n{who}")
    for ax in axes:
        _legend_below(ax)           # over the plot it hid the PR curve at precision 1
    fig.tight_layout()
    return fig


def reliability_diagram(table: pd.DataFrame, headline: dict):
    """Observed share of cancers against the mean prediction per bin, and how many per bin."""
    plt = _plt()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 5.5), height_ratios=[3, 1], sharex=True)
    used = table[table.n > 0]
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
    ax.plot(used.mean_prediction, used.observed_rate, "o-",
            label=f"Brier {_ci(headline, 'brier')}\nECE {_ci(headline, 'ece')}")
    ax.set(ylabel="observed cancer rate", title=f"Reliability (breast)\n{_population(headline)}",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    hx.bar((table.lo + table.hi) / 2, table.n, width=table.hi - table.lo, color="lightgray",
           edgecolor="gray")
    hx.set(yscale="log", xlabel="predicted probability", ylabel="breasts")
    from matplotlib.ticker import LogLocator, ScalarFormatter
    hx.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
    hx.yaxis.set_major_formatter(ScalarFormatter())          # 1, 10, 100: not 10^0, 10^1
    hx.yaxis.set_minor_formatter(plt.NullFormatter())
    fig.tight_layout()
    return fig


def breakdown_forest(table: pd.DataFrame, metric: str = "auc", population: str | None = None):
    """`metric` with its interval for every subgroup (one row each), the whole set on top;
    the title names whose predictions they are (`population`)."""
    plt = _plt()
    t = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(t) + 1.2))
    y = np.arange(len(t))[::-1]
    est = t[metric].to_numpy(dtype=float)
    lo = np.nan_to_num(est - t[f"{metric}_low"].to_numpy(dtype=float))
    hi = np.nan_to_num(t[f"{metric}_high"].to_numpy(dtype=float) - est)
    ax.errorbar(est, y, xerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="o", capsize=2)
    labels = [f"{r.breakdown}={r.group} ({r.level}, {r.n_positives}/{r.n})"
              + ("  [no positives: no AUC]" if not r.n_positives else "") for r in t.itertuples()]
    ax.set_yticks(y, labels, fontsize=7)
    for tick, r in zip(ax.get_yticklabels(), t.itertuples()):
        if not r.n_positives:
            tick.set_color("gray")
    ax.axvline(est[0], ls=":", color="gray")
    ax.set(xlabel=f"{metric} (95% CI)",
           title=f"{metric} by subgroup" + (f": {population}" if population else ""))
    fig.tight_layout()
    return fig
