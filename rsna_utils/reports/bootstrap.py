"""The patient bootstrap of `rsna evaluate`: resamples of patients (`patient_bootstrap_counts`),
every metric of a resample from the patients' multiplicities, vectorised over resamples
(`resampled_metrics`), point estimates and percentile intervals (`patient_intervals`), paired
comparisons of two models (`compare_auc`, `compare_metric`) and the ROC / PR curves with their
bands (`curve_bands`). Moved out of `reports.evaluate` (whose docstring describes the method),
which re-exports them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn import metrics

METRICS = ("auc", "pr_auc", "pf1", "f1", "sensitivity", "specificity", "brier", "ece")
N_BINS = 10
CHUNK = 100                         # resamples computed at once (memory: CHUNK x rows floats)


def patient_bootstrap_counts(n_patients: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n_patients) int32: how often each patient is drawn in each resample (n_patients
    draws with replacement). Resample b is `rng.integers(0, n_patients, n_patients)` of
    `np.random.default_rng(seed)`, the b-th such draw."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, n_patients), np.int32)
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
    return out


def resampled_metrics(y, p, weights, threshold: float, beta: float = 1.0,
                      n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Every metric of METRICS for each row of `weights` (resamples x rows, the rows'
    multiplicities), as if the rows were repeated that often: one array per metric.

    AUC: the Mann-Whitney form of the ROC trapezoid (a tie counts half), as roc_auc_score;
    PR AUC: recall steps times precision at each distinct positive score, as
    average_precision_score; NaN where a class is missing. Two matrix products (one sparse)
    and cumulative sums over the distinct positive scores: no per-resample sort or loop."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pos = y == 1
    pc = np.clip(p, 0, 1)
    called = p >= threshold
    bins = metrics.calibration_bin(p, n_bins)
    # every weighted sum at once: w @ V
    cols = [pos, ~pos, pc * pos, pc * ~pos, called & pos, called & ~pos, (p - y) ** 2]
    v = np.zeros((len(y), len(cols) + n_bins))
    for j, c in enumerate(cols):
        v[:, j] = c
    v[np.arange(len(y)), len(cols) + bins] = pc - y     # per bin: sum of (p - y)
    s = w @ v
    n_pos, n_neg, ctp, cfp, t_tp, t_fp, sq = s[:, :len(cols)].T
    total = n_pos + n_neg

    # ranking: per distinct positive score s_g (ascending), the weight of its positives and of
    # the negatives below it and tied with it. One sparse matrix sends each row to its bucket:
    # positives to their group, negatives to "between s_g-1 and s_g" (2g) or "tied with s_g"
    # (2g+1); one product sums every resample's weights per bucket.
    from scipy import sparse
    s_g = np.unique(p[pos])
    g = len(s_g)
    j = np.searchsorted(s_g, p)                                   # scores s_g below p
    tied = (j < g) & (s_g[np.minimum(j, g - 1)] == p) if g else np.zeros(len(p), bool)
    bucket = np.where(pos, 2 * g + 1 + j, np.where(tied, 2 * j + 1, 2 * j))
    m = sparse.csr_matrix((np.ones(len(p)), (np.arange(len(p)), bucket)), shape=(len(p), 3 * g + 1))
    sums = np.asarray(w @ m)
    cneg = np.cumsum(sums[:, :2 * g + 1], axis=1)
    below, upto = cneg[:, 0:2 * g:2], cneg[:, 1:2 * g:2]         # negatives < s_g, <= s_g
    wpos = sums[:, 2 * g + 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wpos * (below + 0.5 * (upto - below))).sum(1) / (n_pos * n_neg)
        tp = n_pos[:, None] - np.cumsum(wpos, axis=1) + wpos     # positives scored >= s_g
        fp = n_neg[:, None] - below                   # negatives scored >= s_g
        ap = (wpos * np.where(tp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)).sum(1) / n_pos
        auc[(n_pos == 0) | (n_neg == 0)] = np.nan
        ap[n_pos == 0] = np.nan
        b2 = beta * beta
        prec, rec = ctp / (ctp + cfp), ctp / n_pos      # probabilistic F-beta (metrics.pfbeta)
        pf = np.where((ctp > 0) & (n_pos > 0), (1 + b2) * prec * rec / (b2 * prec + rec), 0.0)
        f = np.where(t_tp > 0, (1 + b2) * t_tp / ((1 + b2) * t_tp + b2 * (n_pos - t_tp) + t_fp), 0.0)
        sens = np.where(n_pos > 0, t_tp / n_pos, np.nan)
        spec = np.where(n_neg > 0, (n_neg - t_fp) / n_neg, np.nan)
        brier = sq / total
        ece = np.abs(s[:, len(cols):]).sum(1) / total
    return {"auc": auc, "pr_auc": ap, "pf1": pf, "f1": f, "sensitivity": sens,
            "specificity": spec, "brier": brier, "ece": ece}


def point_metrics(y, p, threshold: float, beta: float = 1.0, n_bins: int = N_BINS) -> dict:
    """The same metrics on the data itself, by the plain functions (scikit-learn for the AUCs)."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    called = p >= threshold
    n_pos, n_neg = int((y == 1).sum()), int((y != 1).sum())
    return {"auc": metrics.roc_auc(y, p), "pr_auc": metrics.pr_auc(y, p),
            "pf1": metrics.pfbeta(y, p, beta), "f1": metrics.fbeta_at(y, p, threshold, beta),
            "sensitivity": float((called & (y == 1)).sum() / n_pos) if n_pos else float("nan"),
            "specificity": float((~called & (y != 1)).sum() / n_neg) if n_neg else float("nan"),
            "brier": metrics.brier_score(y, p),
            "ece": metrics.expected_calibration_error(y, p, n_bins)}


def _intervals(values: dict[str, np.ndarray], ci: float) -> dict:
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for k, v in values.items():
        ok = v[np.isfinite(v)]
        out[f"{k}_low"], out[f"{k}_high"] = (np.percentile(ok, [lo, hi]) if ok.size
                                             else (np.nan, np.nan))
    out["n_boot_valid"] = int(np.isfinite(values["auc"]).sum())
    return out


def _summarise(y, p, patients, counts, threshold, beta, ci) -> dict:
    """Point estimates and intervals of one group (its rows; `patients`: their index into
    the columns of `counts`)."""
    boot = {k: [] for k in METRICS}
    for s in range(0, counts.shape[0], CHUNK):
        r = resampled_metrics(y, p, counts[s:s + CHUNK][:, patients], threshold, beta)
        for k in METRICS:
            boot[k].append(r[k])
    boot = {k: np.concatenate(v) for k, v in boot.items()}
    row = {"n": int(len(y)), "n_patients": int(len(np.unique(patients))),
           "n_positives": int((np.asarray(y) == 1).sum())}
    row["prevalence"] = row["n_positives"] / row["n"] if row["n"] else float("nan")
    point = point_metrics(y, p, threshold, beta)
    iv = _intervals(boot, ci)
    for k in METRICS:
        row[k], row[f"{k}_low"], row[f"{k}_high"] = point[k], iv[f"{k}_low"], iv[f"{k}_high"]
    row["n_boot_valid"] = iv["n_boot_valid"]
    return row


def patient_intervals(y, p, patients, threshold: float = 0.5, n_boot: int = 1000,
                      seed: int = 0, beta: float = 1.0, ci: float = 0.95) -> dict:
    """Every metric of METRICS on these rows (one per breast, say) with its patient-bootstrap
    interval: `patients` gives each row's patient, and a resample draws patients with
    replacement, keeping all their rows (the bootstrap of `evaluate_predictions`). Returns
    n, n_patients, n_positives, prevalence, each metric with _low/_high, n_boot_valid.
    On 0/1 predictions (a binarised submission) pf1 is the F1 of those calls, and
    sensitivity/specificity at `threshold` 0.5 are theirs."""
    codes, uniq = pd.factorize(pd.Series(patients).astype(str))
    counts = patient_bootstrap_counts(len(uniq), n_boot, seed)
    return _summarise(np.asarray(y), np.asarray(p, dtype=np.float64), codes, counts,
                      float(threshold), beta, ci)


def compare_auc(y, p_a, p_b, patients, n_boot: int = 2000, seed: int = 0,
                ci: float = 0.95) -> dict:
    """Is model B's ROC AUC higher than model A's on the same rows? The difference AUC(B) -
    AUC(A) with a PAIRED patient-bootstrap interval: each resample draws patients with
    replacement and scores both models on the same drawn rows, so what the two share (the
    hard cases of this set) cancels. `patients`: one id per row (rows of one patient move
    together). Returns auc_a, auc_b, difference, difference_low/high (the `ci` percentile
    interval), p_not_better (share of resamples where B does not beat A), n_boot_valid."""
    r = compare_metric(y, p_a, p_b, patients, "auc", n_boot, seed, ci)
    return {"auc_a": r.pop("a"), "auc_b": r.pop("b"), **{k: v for k, v in r.items() if k != "metric"}}


def compare_metric(y, p_a, p_b, patients, metric: str = "auc", n_boot: int = 2000,
                   seed: int = 0, ci: float = 0.95) -> dict:
    """`compare_auc` for any metric of METRICS computed without a threshold: auc, pr_auc, or
    pf1 (probabilistic F1; on 0/1 predictions, such as a binarised submission, it is the F1
    of those calls). Returns metric, a, b, difference, difference_low/high, p_not_better,
    n_boot_valid."""
    if metric not in ("auc", "pr_auc", "pf1", "brier"):
        raise RsnaError(f"compare_metric: metric {metric!r}: choose auc, pr_auc, pf1 or brier")
    y = np.asarray(y)
    p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    if not (len(y) == len(p_a) == len(p_b) == len(patients)):
        raise RsnaError(f"compare_auc: labels ({len(y)}), predictions ({len(p_a)}, {len(p_b)}) "
                        f"and patients ({len(patients)}) must be the same rows")
    bad = sorted(set(np.unique(y).tolist()) - {0, 1})
    if bad:
        raise RsnaError(f"compare_auc: labels must be 0 or 1, found {bad[:3]}; map them first")
    if len(np.unique(y)) < 2:
        raise RsnaError("compare_auc: the labels hold one class only; AUC needs positives and "
                        "negatives")
    for name, p in (("first", p_a), ("second", p_b)):
        if not np.isfinite(p).all():
            raise RsnaError(f"compare_auc: the {name} model's predictions hold "
                            f"{int((~np.isfinite(p)).sum())} NaN/inf; drop those rows (or fill "
                            "them as the submission does) for both models")
    patients = pd.Series(patients)
    if patients.isna().any():
        raise RsnaError(f"compare_auc: {int(patients.isna().sum())} row(s) have no patient id; "
                        "every row needs one (rows of one patient are resampled together)")
    codes, uniq = pd.factorize(patients)
    counts = patient_bootstrap_counts(len(uniq), n_boot, seed)
    diff = []
    for s in range(0, n_boot, CHUNK):
        w = counts[s:s + CHUNK][:, codes]
        diff.append(resampled_metrics(y, p_b, w, 0.5)[metric]
                    - resampled_metrics(y, p_a, w, 0.5)[metric])
    d = np.concatenate(diff)
    d = d[np.isfinite(d)]                       # a resample with one class has no AUC
    a, b = (point_metrics(y, p, 0.5)[metric] for p in (p_a, p_b))
    lo, hi = (np.percentile(d, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]) if d.size
              else (np.nan, np.nan))
    better = (d <= 0) if metric != "brier" else (d >= 0)      # a lower Brier score is better
    return {"metric": metric, "a": float(a), "b": float(b), "difference": float(b - a),
            "difference_low": float(lo), "difference_high": float(hi),
            "p_not_better": float(better.mean()) if d.size else float("nan"),
            "n_boot_valid": int(d.size)}


# ----------------------------------------------------------------------------------------
# Curves with bands
# ----------------------------------------------------------------------------------------

def curve_bands(y, p, counts_rows, ci: float = 0.95, points: int = 201) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROC (TPR on an FPR grid, linear between the curve's corners) and PR (interpolated
    precision: the best precision at recall >= r) on grids, the point curve and its
    percentile band over the resamples (`counts_rows`: resamples x rows multiplicities)."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    grid = np.linspace(0, 1, points)

    def roc_at(fpr, tpr):
        return np.interp(grid, fpr, tpr)

    def pr_at(recall, precision):          # recall ascending
        best = np.maximum.accumulate(precision[::-1])[::-1]
        i = np.searchsorted(recall, grid, side="left")
        return np.where(i < len(best), best[np.minimum(i, len(best) - 1)], 0.0)

    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    roc_point, pr_point = roc_at(fpr, tpr), pr_at(rec[::-1], prec[::-1])
    order = np.argsort(-p, kind="mergesort")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    pos = (y == 1)[order]
    rocs, prs = [], []
    for s in range(0, counts_rows.shape[0], CHUNK):
        ws = np.asarray(counts_rows[s:s + CHUNK], dtype=np.float64)[:, order]
        tp = np.cumsum(np.add.reduceat(ws * pos, starts, axis=1), axis=1)
        fp = np.cumsum(np.add.reduceat(ws * ~pos, starts, axis=1), axis=1)
        for t, f in zip(tp, fp):
            if t[-1] == 0 or f[-1] == 0:
                continue
            rocs.append(roc_at(np.r_[0, f / f[-1]], np.r_[0, t / t[-1]]))
            called = t + f
            prec_b = np.where(called > 0, t / np.where(called > 0, called, 1), 1.0)
            prs.append(pr_at(np.r_[0, t / t[-1]], np.r_[1.0, prec_b]))
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    rb = np.percentile(np.array(rocs), [lo, hi], axis=0) if rocs else np.full((2, points), np.nan)
    pb = np.percentile(np.array(prs), [lo, hi], axis=0) if prs else np.full((2, points), np.nan)
    roc = pd.DataFrame({"fpr": grid, "tpr": roc_point, "tpr_low": rb[0], "tpr_high": rb[1]})
    pr = pd.DataFrame({"recall": grid, "precision": pr_point, "precision_low": pb[0],
                       "precision_high": pb[1]})
    return roc, pr
