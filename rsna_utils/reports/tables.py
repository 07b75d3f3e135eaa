"""Tables as a reader wants them in a notebook: scores to three decimals, counts as integers,
empty cells blank, one row per thing rather than 40 lines of a dict; an empty table says so."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

COUNT = re.compile(r"^(n|n_.*|.*_n|count|images|breasts|patients|positives?|views|epoch|"
                   r"unreadable|flagged|fold.*)$")
LEVELS = ("image", "breast_mean", "breast_max")
LEVEL_NAMES = {"image": "image", "breast_mean": "breast (mean of views)",
               "breast_max": "breast (max of views)"}
# pF1 named for what it is scored on: the probabilities, or calls binarised at a cut
METRIC_NAMES = {"auc": "AUC", "pr_auc": "PR-AUC", "pf1": "pF1 (probabilities)",
                "f1": "pF1 (binarised at the cut)", "sensitivity": "sensitivity at the cut",
                "specificity": "specificity at the cut", "best_threshold": "best threshold",
                "best_f1": "pF1 (binarised at the best threshold)", "log_loss": "log loss",
                "brier": "Brier", "ece": "ECE"}


def tidy(table, digits: int = 3, empty: str = "nothing to show"):
    """A DataFrame (or dict: one row per key) styled for reading: floats to `digits` decimals,
    count columns as integers, NaN blank. An empty table prints `empty` instead."""
    df = pd.DataFrame(table.items(), columns=["", "value"]).set_index("") if isinstance(
        table, dict) else table
    if len(df) == 0:
        print(empty)
        return None
    fmt = {}
    for c in df.columns:
        if str(c).endswith("_id") or str(c) == "id":
            continue                  # identifiers as they are, not 462,822,612
        if COUNT.match(str(c)):
            fmt[c] = lambda v: "" if _missing(v) else f"{int(v):,}"
        elif pd.api.types.is_numeric_dtype(df[c]) or df[c].map(_is_number).all():
            fmt[c] = lambda v, d=digits: _number(v, d)
    return df.style.format(fmt, na_rep="")


def metrics_table(metrics: dict) -> pd.DataFrame:
    """`metrics.evaluate`'s flat dict ({level}_{metric}) as one row per level and one column
    per metric, in words."""
    rows = {}
    for key, v in metrics.items():
        level = next((lv for lv in sorted(LEVELS, key=len, reverse=True)
                      if key.startswith(lv + "_")), None)
        if level is None:
            continue
        name = key[len(level) + 1:]
        rows.setdefault(LEVEL_NAMES[level], {})[METRIC_NAMES.get(name, name)] = v
    return pd.DataFrame.from_dict(rows, orient="index")


def interval_table(headline: dict) -> pd.DataFrame:
    """An evaluation's headline (metric, metric_low, metric_high, ...) as one row per metric
    with its 95% interval."""
    names = [k for k in headline if f"{k}_low" in headline and f"{k}_high" in headline]
    return pd.DataFrame({"value": [headline[k] for k in names],
                         "95% low": [headline[f"{k}_low"] for k in names],
                         "95% high": [headline[f"{k}_high"] for k in names]},
                        index=[METRIC_NAMES.get(k, k) for k in names])


def column_summary(df: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """One row per column: its kind, distinct values, missing share, and the most common
    values with their shares (or the range of a numeric column) - instead of describe()'s
    wall of NaN."""
    rows = []
    if len(df.columns) == 0:
        return pd.DataFrame(columns=["kind", "distinct", "missing", "values"])
    for c in df.columns:
        s = df[c]
        numeric = pd.api.types.is_numeric_dtype(s) and s.nunique() > 12
        if str(c).endswith("_id"):
            numeric, what = False, f"identifiers, e.g. {s.dropna().iloc[0] if s.notna().any() else ''}"
        elif numeric:
            what = f"{s.min():g} to {s.max():g} (median {s.median():g})"
        else:
            shares = s.astype(str).value_counts(normalize=True).head(top)
            what = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        rows.append({"column": c, "kind": "number" if numeric else "category",
                     "distinct": int(s.nunique()), "missing": float(s.isna().mean()),
                     "values": what})
    return pd.DataFrame(rows).set_index("column")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _is_number(v) -> bool:
    return _missing(v) or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))


def _number(v, digits: int) -> str:
    if _missing(v):
        return ""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return str(v)
    if float(v).is_integer() and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"
