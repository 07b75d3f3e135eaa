"""The table of training images: train.csv (or any RSNA-shaped CSV) joined to the
preprocessed PNGs, one row per image with its `png` path. The patient-grouped splits of the
table live with the RSNA table (`core.table`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import png_path, with_prediction_id


def load_table(csv: str | Path, png_dir: str | Path | None = None,
               require_png: bool = True) -> pd.DataFrame:
    """train.csv (or any CSV with patient_id, image_id, laterality, cancer) plus a `png` column.

    Images listed in the preprocessor's failures.csv are dropped (they have no PNG) and counted
    in `df.attrs["dropped"]`; any other missing PNG is an error naming it.
    """
    try:
        df = pd.read_csv(csv)
    except FileNotFoundError:
        raise RsnaError(f"{csv}: CSV not found; pass the train.csv path") from None
    need = {"patient_id", "image_id", "laterality"}
    if not need <= set(df.columns):
        raise RsnaError(f"{csv}: missing column(s) {sorted(need - set(df.columns))}")
    df = df.dropna(subset=["patient_id", "image_id"]).copy()
    df["patient_id"] = df["patient_id"].astype("int64")
    df["image_id"] = df["image_id"].astype("int64")
    df = with_prediction_id(df)
    if png_dir is None:
        return df
    png_dir = Path(png_dir)
    df["png"] = [str(png_path(png_dir, p, i)) for p, i in zip(df.patient_id, df.image_id)]
    failed: set[int] = set()
    for f in png_dir.glob("failures*.csv"):
        try:
            fd = pd.read_csv(f, dtype=str)
            failed |= {int(x) for x in fd["image_id"] if str(x).isdigit()}
        except (pd.errors.EmptyDataError, KeyError):
            pass
    dropped = df["image_id"].isin(failed)
    df = df[~dropped].reset_index(drop=True)
    df.attrs["dropped"] = int(dropped.sum())
    if require_png:
        exists = np.array([Path(p).exists() for p in df["png"]], dtype=bool)
        if not exists.all():
            missing = df.loc[~exists, "png"].tolist()
            raise RsnaError(f"{len(missing)} PNG(s) missing under {png_dir}, e.g. {missing[0]}; "
                            "run `rsna preprocess` on these images (or fix --data)")
    return df
