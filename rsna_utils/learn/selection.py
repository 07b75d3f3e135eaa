"""Which epoch becomes best.pt: its selection score (`selection_score`, over a window of
epochs), whether the window is full (`full_window`) and the update of the best so far
(`update_best`). Moved out of `learn.train`, which re-exports them."""
from __future__ import annotations

import math

import numpy as np

from rsna_utils.learn.run_files import _plain
from rsna_utils.learn.train_config import SELECT_BY, TrainConfig


def full_window(cfg: TrainConfig, history: list[dict]) -> bool:
    """Whether this epoch may become best.pt under `select_window`: once the window is full (or
    the run is shorter than the window), so an early epoch is not judged on itself alone."""
    return cfg.select_window <= 1 or len(history) >= min(cfg.select_window, cfg.epochs)


def update_best(best: dict | None, m: dict, epoch: int, select_by: str,
                history: list[dict] | None = None, window: int = 1,
                eligible: bool = True) -> tuple[dict, bool]:
    """(best, improved): this epoch becomes the best when its selection score is higher, or
    equal: a tie goes to the later epoch, trained longer on the same validation evidence (a
    small validation set saturates: on the synthetic check of issue 37 item 6 the breast AUC
    was 1.000 after each of 2 epochs, and the first epoch's weights scored 0.00-0.07 lower
    breast AUC on new patients than the second's in three seeded pairs). With
    `window` > 1 the chosen measure is averaged over this epoch and the window - 1 before it
    (`history`, this epoch last): one epoch's breast AUC on ~120 positive breasts is noisy.
    An epoch before the window is full is not `eligible` (`full_window`)."""
    if not eligible:
        return best, False
    score = selection_score(m, select_by, history, window)
    # the best's score is rebuilt from its stored metrics: a resumed run may select by another
    # measure, and older checkpoints stored (pF1, AUC); a windowed score is kept as it was made
    if best is not None:
        if window > 1 and best.get("window") == window and best.get("select_by") == select_by:
            before = tuple(best["score"])
        else:
            before = selection_score(best.get("metrics", {}), select_by)
        if score < before:
            return best, False
    return {"epoch": epoch, "score": list(score), "metrics": _plain(m), "select_by": select_by,
            "window": window}, True


def selection_score(m: dict, select_by: str, history: list[dict] | None = None,
                    window: int = 1) -> tuple:
    """What picks best.pt: the chosen breast-level measure (its mean over the last `window`
    epochs of `history` when given), then this epoch's PR-AUC, then its AUC."""
    key = SELECT_BY[select_by]
    recent = (history or [])[-window:] if window > 1 else []
    head = float(np.mean([_nan0(h.get(key)) for h in recent])) if recent else _nan0(m.get(key))
    return (head, _nan0(m.get("breast_mean_pr_auc")), _nan0(m.get("breast_mean_auc")))


def _nan0(x: float) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
