"""The cut: what the submission holds of the ensemble's breast probabilities. The output kind
(probability, calibrated or binary: `resolve_output`), the binary cut at a threshold or the top
quantile of breasts (`binarize`), the fallback to the out-of-fold positive rate when the share a
threshold flags is out of range (`binary_cut`), and the checks Kaggle fails a file for
(`validate_submission`). `LoadedEnsemble.cut` applies it; `predict.submission` writes it."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import SUBMISSION_COLUMNS

OUTPUTS = ("probability", "calibrated", "binary")


# The cut fallback (`binary_cut`). ensemble.json carries one out-of-fold positive rate (its
# "quantile": the share of breasts the tuned threshold flagged out of fold), not the spread of
# that share over the folds, so the range a test set may flag at the threshold is a stated factor
# around it. A factor of 3 either way leaves alone what ordinary variation does to the share
# (the test set's cancer rate, and a threshold tuned on a few hundred positive breasts, move it
# by tens of percent) and catches a shift of the scores' scale (another decoder, scanner mix or
# flip) that makes the threshold flag next to nothing or several times too many breasts.
FALLBACK_FACTOR = 3.0


# The share is judged only where the rate expects at least this many flagged breasts: with 10
# expected, a count below the range (3 or fewer) has a chance of about 1% when nothing shifted;
# on a few dozen breasts (Kaggle's visible test) 0 or 1 flagged says nothing about the cut.
FALLBACK_MIN_EXPECTED = 10.0


def binarize(values: np.ndarray, how: str | None, threshold: float) -> np.ndarray:
    """None: probabilities; "threshold": >= the checkpoint's tuned threshold; "quantile:q":
    the top q share (e.g. quantile:0.02) set to 1."""
    if not how:
        return values
    if how == "threshold":
        return (values >= threshold).astype(np.float64)
    cut = np.quantile(values, 1 - quantile_share(how))
    return (values >= cut).astype(np.float64)


def binary_cut(values: np.ndarray, how: str | None, threshold: float,
               oof_rate: float | None = None, fallback: bool = True) -> tuple[np.ndarray, dict]:
    """`binarize`, and what it flagged: (0/1 per breast, record). The record (PredictResult.cut)
    holds binarize, threshold, breasts, flagged and share (at the cut asked for), oof_rate,
    range, judged (whether the share was held against the range), fell_back, and the submitted
    flagged / submitted_share, with "line": one sentence saying all that.

    With "threshold" and `oof_rate` (an ensemble's out-of-fold positive rate): the share flagged
    is held against the range [rate / FALLBACK_FACTOR, rate x FALLBACK_FACTOR], when the test set
    is large enough to tell (n x rate >= FALLBACK_MIN_EXPECTED); outside it, and with
    `fallback`, the top `oof_rate` of the breasts is flagged instead (`binarize` "quantile:rate",
    the cut the ensemble's quantile mode would make)."""
    how = how or "threshold"
    values = np.asarray(values, dtype=np.float64)
    out = binarize(values, how, threshold)
    n, flagged = len(values), int(out.sum())
    share = flagged / n if n else 0.0
    at = (f"threshold {threshold:.4f}" if how == "threshold"
          else f"the top {quantile_share(how):.2%} ({how})")
    rec = {"binarize": how, "threshold": float(threshold) if how == "threshold" else None,
           "breasts": n, "flagged": flagged, "share": share, "oof_rate": oof_rate,
           "range": None, "judged": False, "fell_back": False,
           "submitted_flagged": flagged, "submitted_share": share}
    head = f"binary output: {flagged:,} of {n:,} breasts ({share:.2%}) flagged at {at}"
    if how != "threshold" or oof_rate is None:
        return out, {**rec, "line": head}
    rate = float(oof_rate)
    lo, hi = rate / FALLBACK_FACTOR, min(rate * FALLBACK_FACTOR, 1.0)
    rec["range"] = [lo, hi]
    span = (f"the out-of-fold range {lo:.2%}-{hi:.2%} (the ensemble's out-of-fold positive rate "
            f"{rate:.2%}, /{FALLBACK_FACTOR:g} to x{FALLBACK_FACTOR:g})")
    expected = n * rate
    if expected < FALLBACK_MIN_EXPECTED:
        return out, {**rec, "line": f"{head}; too few breasts to hold that share against {span}: "
                                    f"{expected:.1f} expected flagged, under "
                                    f"{FALLBACK_MIN_EXPECTED:g}; kept the threshold"}
    rec["judged"] = True
    if lo <= share <= hi:
        return out, {**rec, "line": f"{head}, inside {span}: kept the threshold"}
    if not fallback:
        return out, {**rec, "line": f"{head}, OUTSIDE {span}; cut_fallback is off: kept the "
                                    "threshold"}
    out = binarize(values, f"quantile:{rate!r}", threshold)
    now = int(out.sum())
    rec.update(fell_back=True, submitted_flagged=now, submitted_share=now / n)
    rec["line"] = (f"cut fallback: threshold {threshold:.4f} flagged {flagged:,} of {n:,} breasts "
                   f"({share:.2%}), outside {span}; flagged the top {rate:.2%} instead (the "
                   f"quantile cut: {now:,} breasts, {now / n:.2%})")
    return out, rec


def quantile_share(how: str) -> float:
    """"quantile:0.02" -> 0.02; RsnaError for anything else."""
    kind, _, q = str(how).partition(":")
    try:
        share = float(q) if kind == "quantile" else None
    except ValueError:
        share = None
    if share is None:
        raise RsnaError(f"binarize_how={how!r}: choose threshold or quantile:Q (e.g. quantile:0.02)")
    if not 0 < share < 1:
        raise RsnaError(f"binarize_how={how!r}: the share must be in (0, 1), e.g. quantile:0.02")
    return share


def resolve_output(output: str | None, binarize_how: str | None,
                   calibrator: dict | None = None, agg: str = "mean") -> tuple[str, str | None]:
    """What the submission holds: "probability" (the ensemble's breast probability),
    "calibrated" (that probability through `calibrator`, `calibrate.apply_calibrator`) or
    "binary" (0/1 at `binarize_how`: "threshold" (default) or "quantile:q").
    Default: binary when `binarize_how` is given (the old --binarize), else probability.
    Returns (output, binarize_how); RsnaError for a combination that cannot be meant."""
    if output is None:
        output = "binary" if binarize_how else "probability"
    if output not in OUTPUTS:
        raise RsnaError(f"output {output!r}: choose one of {', '.join(OUTPUTS)}")
    if output != "binary" and binarize_how:
        raise RsnaError(f"--binarize {binarize_how} with --output {output}: binarising gives "
                        "--output binary; drop one of them")
    if output == "binary":
        return output, binarize_how or "threshold"
    if output == "calibrated":
        from rsna_utils.infer.calibrate import check_calibrator
        if calibrator is None:
            raise RsnaError("--output calibrated needs a calibrator: pass --ensemble "
                            "ensemble.json written by `rsna oof` (it fits one on the out-of-fold "
                            "predictions), or calibrator= to predict()")
        check_calibrator(calibrator)
        if calibrator.get("agg", agg) != agg:
            raise RsnaError(f"the calibrator was fitted on {calibrator['agg']}-aggregated breasts "
                            f"but the views are aggregated with {agg}; use --agg "
                            f"{calibrator['agg']} or refit with `rsna oof --agg {agg}`")
    return output, None


def validate_submission(sub: pd.DataFrame, expected_ids: list[str]) -> None:
    """The checks Kaggle would fail a file for; raises RsnaError saying which one."""
    if list(sub.columns) != SUBMISSION_COLUMNS:
        raise RsnaError(f"submission columns {list(sub.columns)}: must be "
                        f"{','.join(SUBMISSION_COLUMNS)}")
    if sub["prediction_id"].duplicated().any():
        raise RsnaError(f"duplicated prediction_id {sub.prediction_id[sub.prediction_id.duplicated()].iloc[0]!r}")
    missing = set(expected_ids) - set(sub["prediction_id"])
    extra = set(sub["prediction_id"]) - set(expected_ids)
    if missing or extra:
        raise RsnaError(f"submission ids differ from the expected ones: {len(missing)} missing "
                        f"(e.g. {sorted(missing)[:2]}), {len(extra)} extra (e.g. {sorted(extra)[:2]})")
    v = pd.to_numeric(sub["cancer"], errors="coerce")
    if v.isna().any():
        raise RsnaError(f"cancer is NaN or not a number for {int(v.isna().sum())} row(s), e.g. "
                        f"{sub.prediction_id[v.isna()].iloc[0]!r}")
    if ((v < 0) | (v > 1)).any():
        raise RsnaError(f"cancer outside [0, 1] for {int(((v < 0) | (v > 1)).sum())} row(s)")


def breast_output(values: np.ndarray, output: str, binarize_how: str | None = None,
                  threshold: float = 0.5, calibrator: dict | None = None,
                  unread: np.ndarray | None = None) -> np.ndarray:
    """The submission's column from the breast probabilities: as they are (probability),
    through the calibrator (calibrated; breasts flagged in `unread` keep their value, the
    prior) or 0/1 (binary: `binarize` of the raw values)."""
    if output == "probability":
        return values
    if output == "binary":
        return binarize(values, binarize_how or "threshold", threshold)
    if output == "calibrated":
        from rsna_utils.infer.calibrate import apply_calibrator
        if calibrator is None:
            raise RsnaError("output calibrated: no calibrator given (ensemble.json's "
                            "\"calibrator\" from `rsna oof`)")
        cal = apply_calibrator(calibrator, values)
        return np.where(unread, values, cal) if unread is not None else cal
    raise RsnaError(f"output {output!r}: choose one of {', '.join(OUTPUTS)}")

