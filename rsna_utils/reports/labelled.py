"""Labelled predictions as `rsna evaluate` reads them: the predictions (CSV or DataFrame) with
the labels and the breakdown columns joined from train.csv (`load_predictions`), the age bands,
and one row per breast (`breast_table`). Moved out of `reports.evaluate`, which re-exports
them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import with_prediction_id
from rsna_utils.learn import metrics

BREAKDOWN_COLUMNS = ("site_id", "machine_id", "view", "density", "age")   # joined from the meta
BREAST_BREAKDOWNS = ("site_id", "machine_id", "density", "age_band")   # a breast's attribute
IMAGE_BREAKDOWNS = ("view",)                                            # differs per image
AGE_BANDS = (50, 60, 70)            # -> <50, 50-59, 60-69, 70+


def _read(table, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(table, pd.DataFrame):
        return table.copy(), f"the {what} table"
    path = Path(table)
    if not path.exists():
        raise RsnaError(f"{path}: {what} file not found")
    try:
        return pd.read_csv(path), str(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: cannot be read as CSV ({type(e).__name__}); pass the {what} "
                        "CSV") from None


def _with_prediction_id(d: pd.DataFrame) -> pd.DataFrame:
    if {"patient_id", "laterality"} <= set(d.columns):
        d = with_prediction_id(d)
    return d


def load_predictions(predictions, meta=None) -> pd.DataFrame:
    """The predictions (CSV path or DataFrame) with cancer, prediction, prediction_id,
    patient_id and what `meta` (train.csv) adds: its columns the predictions lack, joined on
    image_id (on prediction_id when the predictions have no image_id). Adds `age_band`.
    Rows with no prediction (unreadable images) are dropped; attrs["dropped_nan"] counts them."""
    df, name = _read(predictions, "predictions")
    if "prediction" not in df:
        hint = (" (a submission.csv: its `cancer` column is the prediction, and the labels come "
                "from --meta)" if list(df.columns) == ["prediction_id", "cancer"] else "")
        raise RsnaError(f"{name}: no `prediction` column{hint}; pass val_predictions.csv, "
                        "oof_predictions.csv or the _images.csv of `rsna predict`")
    df = _with_prediction_id(df)
    if meta is not None:
        m, mname = _read(meta, "meta")
        m = _with_prediction_id(m)
        key = "image_id" if "image_id" in df and "image_id" in m else "prediction_id"
        if key not in df or key not in m:
            raise RsnaError(f"{name} and {mname} share neither image_id nor prediction_id "
                            "(patient_id + laterality); pass train.csv as the meta")
        wanted = ("cancer", "patient_id", "laterality", "prediction_id") + BREAKDOWN_COLUMNS
        add = [c for c in wanted if c in m and c not in df and c != key]
        if add:
            m = m.assign(**{key: m[key].astype(str)})
            side = m[[key] + add].groupby(key, sort=False).first()
            joined = df[key].astype(str).isin(side.index)
            if not joined.any():
                raise RsnaError(f"none of the {len(df)} {key}s of {name} is in {mname}; pass the "
                                "train.csv these predictions were made on")
            df = df.assign(_key=df[key].astype(str)).join(side, on="_key").drop(columns="_key")
            df.attrs["unmatched_meta"] = int((~joined).sum())
        df = _with_prediction_id(df)
    if "cancer" not in df:
        raise RsnaError(f"{name}: no `cancer` label column; pass meta_csv=train.csv (--meta) to "
                        "join it on image_id")
    if "prediction_id" not in df:
        raise RsnaError(f"{name}: no prediction_id (nor patient_id + laterality) to group views "
                        "into breasts; add them or pass --meta train.csv")
    if "patient_id" not in df:       # prediction_id is f"{patient_id}_{laterality}"
        df["patient_id"] = df["prediction_id"].astype(str).str.rsplit("_", n=1).str[0]
    y = pd.to_numeric(df["cancer"], errors="coerce")
    if y.isna().any() or not y.isin([0, 1]).all():
        bad = int((y.isna() | ~y.isin([0, 1])).sum())
        raise RsnaError(f"{name}: {bad} row(s) whose cancer label is missing or not 0/1 (e.g. "
                        f"{df.loc[y.isna() | ~y.isin([0, 1]), 'prediction_id'].iloc[0]!r}); "
                        "predictions not in the meta CSV? pass the train.csv they come from")
    p = pd.to_numeric(df["prediction"], errors="coerce")
    if ((p < 0) | (p > 1)).any():
        raise RsnaError(f"{name}: predictions outside [0, 1] (min {p.min():.3g}, max "
                        f"{p.max():.3g}); these look like logits: pass probabilities "
                        "(sigmoid of the logit)")
    df["cancer"] = y.astype("int64")
    df["prediction"] = p.astype("float64")
    dropped = int(p.isna().sum())
    df = df[p.notna()].reset_index(drop=True)
    if "age" in df:
        df["age_band"] = age_band(df["age"])
    df.attrs["dropped_nan"] = dropped
    df.attrs["source"] = name
    return df


def age_band(age, bands=AGE_BANDS) -> pd.Series:
    """Age -> "<50", "50-59", "60-69", "70+" (for the default bands); "missing" when NaN."""
    a = pd.to_numeric(pd.Series(age), errors="coerce")
    labels = age_band_labels(bands)
    cut = pd.cut(a, [-np.inf, *bands, np.inf], right=False, labels=labels)
    return cut.astype(object).where(a.notna(), "missing")


def age_band_labels(bands=AGE_BANDS) -> list[str]:
    return ([f"<{bands[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(bands, bands[1:])]
            + [f"{bands[-1]}+"])


def breast_table(df: pd.DataFrame, agg: str = "mean") -> pd.DataFrame:
    """One row per breast: the views' predictions aggregated (`metrics.breast_level`), the
    label the max, patient_id and the breast attributes (first non-missing value)."""
    b = metrics.breast_level(df, "prediction", "cancer", agg)
    attrs = [c for c in ("patient_id",) + BREAST_BREAKDOWNS if c in df]
    first = df.groupby("prediction_id", sort=False)[attrs].first()
    return b.join(first, on="prediction_id")
