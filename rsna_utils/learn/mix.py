"""Training on a mix of sources: the competition's images and public datasets ingested into
its shape (`rsna ingest`), told apart by `site_id`.

- Names: a source is `rsna` (sites 1 and 2) or an ingest format (`cbis-ddsm` 101, `vindr` 102,
  `cmmd` 103: `sources.ingest.FORMATS` gives each its site, tests/learn/test_mix.py holds the two
  equal); any other site is `site N`. SOURCE_SITES is the one map training reads.
- `TrainConfig.source_weights` ({name or site_id: weight}): an image of that source is drawn
  `weight` times an epoch on average by the sampler (`learn.data.epoch_indices`), before the
  positives are upsampled; `row_weights` turns it into one weight per row.
- `TrainConfig.val_sites` (default [1, 2], RSNA only, as the winners validated): only rows of
  those sites are split into folds; every other source always trains (`split_folds`, fold -1).
- `source_table` / `report_sources`: per source the training images and positives, weight,
  draws per epoch and share of the epoch, validation images; printed one line a source and
  written as the run's `sources.csv`. `run_sources` adds the per-source validation AUC for the
  run report.
- A plan's `sources:` list: `sources.mix`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import RSNA_SITES, SOURCE_SITES  # noqa: F401 - read here by callers

SOURCES_FILE = "sources.csv"
DRAW_EPOCHS = 8          # sampler epochs averaged for the expected draws per source


def source_sites() -> dict[str, tuple[int, ...]]:
    """Source name -> its site ids (SOURCE_SITES)."""
    return dict(SOURCE_SITES)


def source_name(site_id) -> str:
    """The source of a site id: rsna, cbis-ddsm, vindr, cmmd, or "site N"."""
    if site_id is None or (isinstance(site_id, float) and math.isnan(site_id)):
        return "unknown site"
    for name, sites in source_sites().items():
        if int(site_id) in sites:
            return name
    return f"site {int(site_id)}"


def _known() -> str:
    return ", ".join(source_sites())


def _site_key(key) -> int | None:
    """An integer site id written as a key (101, "101"), else None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, float) and key.is_integer():
        return int(key)
    if isinstance(key, str) and key.strip().isdigit():
        return int(key.strip())
    return None


# ----------------------------------------------------------------------------------------
# The two settings (TrainConfig parses them here)
# ----------------------------------------------------------------------------------------

def parse_source_weights(value) -> dict[str, float]:
    """{source name or site id: weight >= 0}, from a mapping or "cbis-ddsm=0.5,vindr=1" (the
    flag); None / "" / {} -> {} (every image weight 1). Keys become strings (names as given,
    site ids as digits). One RsnaError line naming the value and the fix otherwise."""
    fix = (f"give source=weight pairs, e.g. cbis-ddsm=0.5,vindr=1 (sources: {_known()}, or a "
           "site_id number)")
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null", "{}"):
            return {}
        pairs = {}
        for part in text.split(","):
            name, eq, w = part.partition("=")
            if not eq or not name.strip() or not w.strip():
                raise RsnaError(f"source_weights={value!r}: {part.strip()!r} is not source=weight; "
                                f"{fix}")
            pairs[name.strip()] = w.strip()
        value = pairs
    if not isinstance(value, dict):
        raise RsnaError(f"source_weights={value!r}: give a mapping of source to weight; {fix}")
    names, out = source_sites(), {}
    for key, w in value.items():
        site = _site_key(key)
        if site is None and str(key).strip().lower() not in names:
            raise RsnaError(f"source_weights: unknown source {key!r}; use one of {_known()} or a "
                            f"site_id number (e.g. cbis-ddsm=0.5)")
        try:
            weight = float(w)
        except (TypeError, ValueError):
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise RsnaError(f"source_weights: weight {w!r} of {key!r}: give a number >= 0 (0 "
                            "leaves the source out of training, 0.5 draws half its images an "
                            "epoch, 2 each twice)")
        out[str(site) if site is not None else str(key).strip().lower()] = weight
    return out


def parse_val_sites(value) -> list[int]:
    """Site ids validated on, sorted: a list of ids or source names (rsna = 1 and 2), or their
    text "1,2" / "rsna,cbis-ddsm" (the flag); None, [] or "all" -> [] (validate on every source)."""
    fix = (f"give site ids or source names ({_known()}), e.g. 1,2 (RSNA only) or all (every "
           "source)")
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "all", "none", "null", "[]"):
            return []
        value = [v for v in text.split(",")]
    if not isinstance(value, (list, tuple)):
        raise RsnaError(f"val_sites={value!r}: {fix}")
    names, sites = source_sites(), set()
    for v in value:
        site = _site_key(v)
        if site is not None:
            sites.add(site)
        elif isinstance(v, str) and v.strip().lower() in names:
            sites.update(names[v.strip().lower()])
        else:
            raise RsnaError(f"val_sites: {v!r} is not a site id or a source name; {fix}")
    return sorted(sites)


def _arg(parse):
    """The argparse `type` of a flag: argparse's one-line error naming the value."""
    def arg(text: str):
        import argparse
        try:
            return parse(text)
        except RsnaError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    arg.__name__ = parse.__name__.replace("parse_", "")
    return arg


source_weights_arg = _arg(parse_source_weights)
val_sites_arg = _arg(parse_val_sites)


# ----------------------------------------------------------------------------------------
# Per-row sources, weights and validation rows
# ----------------------------------------------------------------------------------------

def has_sites(df: pd.DataFrame) -> bool:
    return "site_id" in df and df["site_id"].notna().any()


def sources_of(df: pd.DataFrame) -> pd.Series:
    """The source name of every row ("rsna" for all when the table has no site_id)."""
    if not has_sites(df):
        return pd.Series("rsna", index=df.index, name="source")
    names = {s: source_name(s) for s in pd.unique(df["site_id"])}
    return df["site_id"].map(names).rename("source")


def row_weights(df: pd.DataFrame, source_weights: dict,
                where: str = "the CSV") -> np.ndarray | None:
    """One sampling weight per row from `source_weights` (a site id's weight wins over its
    source name's; unlisted sources 1); None when no weight is given (the sampler as before)."""
    if not source_weights:
        return None
    if not has_sites(df):
        raise RsnaError(f"source_weights={source_weights}: {where} has no site_id column, so no "
                        "image has a source; drop source_weights, or train on a table made by "
                        "`rsna ingest` / `rsna ingest --combine`")
    names = source_sites()
    w = np.ones(len(df))
    site = pd.to_numeric(df["site_id"], errors="coerce").to_numpy()
    for key, weight in source_weights.items():        # names first, then site ids over them
        if key in names:
            w[np.isin(site, names[key])] = weight
    for key, weight in source_weights.items():
        if key.isdigit():
            w[site == int(key)] = weight
    return w


def validatable(df: pd.DataFrame, val_sites: list[int] | None, where: str = "the CSV",
                default: tuple = RSNA_SITES) -> np.ndarray:
    """Rows that may be validated on: those of `val_sites` (every row when it is empty, or
    when the table has no site_id and val_sites is the default). One RsnaError line when no
    row, or no positive, is left to validate on (a table whose every row is validatable is
    left to `data.check_split`, as before)."""
    if not val_sites:
        return np.ones(len(df), bool)
    if not has_sites(df):
        if tuple(val_sites) == tuple(default):
            return np.ones(len(df), bool)
        raise RsnaError(f"val_sites={list(val_sites)}: {where} has no site_id column; validate on "
                        "every image (val_sites all) or train on a table with sites")
    site = pd.to_numeric(df["site_id"], errors="coerce")
    mask = site.isin(val_sites).to_numpy()
    have = ", ".join(str(int(s)) for s in sorted(site.dropna().unique()))
    if not mask.any():
        raise RsnaError(f"val_sites={list(val_sites)}: no image of {where} comes from these sites "
                        f"(it has sites {have}); give some of those, or val_sites all "
                        "(--val-sites all) to validate on every source")
    if "cancer" in df and not mask.all() and not (df.loc[mask, "cancer"] > 0.5).any():
        raise RsnaError(f"val_sites={list(val_sites)}: the {int(mask.sum())} images of these sites "
                        f"in {where} hold no positive, so no validation score can be computed; "
                        f"add a site with positives (it has sites {have}) or use val_sites all")
    return mask


def split_folds(df: pd.DataFrame, split: str, val_frac: float, folds: int, seed: int,
                val_sites: list[int] | None, where: str = "the CSV") -> pd.Series:
    """Fold per row, grouped by patient: the rows `validatable` by val_sites are split as
    `holdout_split` / `patient_folds` split them, stratified by source and label (source ids
    never collide: each ingest source has its own id range); every other row gets -1 and always
    trains. A table of one source (or without site_id) is split exactly as before."""
    from rsna_utils.core.table import holdout_split, patient_folds
    mask = validatable(df, val_sites, where)
    sub = df[mask].copy()
    src = sources_of(sub)
    codes = {s: k for k, s in enumerate(sorted(pd.unique(src)))}
    sub["_stratum"] = src.map(codes).to_numpy() * 2 + (sub["cancer"] > 0.5).astype(int)
    part = (holdout_split(sub, val_frac, seed, label="_stratum") if split == "holdout"
            else patient_folds(sub, folds, seed, label="_stratum"))
    fold = pd.Series(-1, index=df.index, name="fold")
    fold[mask] = part.to_numpy()
    return fold


# ----------------------------------------------------------------------------------------
# Per-source figures
# ----------------------------------------------------------------------------------------

SOURCE_COLUMNS = ["source", "sites", "train_images", "train_positives", "weight",
                  "draws_per_epoch", "positive_draws_per_epoch", "epoch_share", "val_images",
                  "val_positives"]


def source_table(train: pd.DataFrame, val: pd.DataFrame, cfg) -> pd.DataFrame:
    """One row per source: training images and positives, its weight, the items the sampler
    draws of it per epoch (images; breasts for a breast-level model: the mean of DRAW_EPOCHS
    seeded epochs of `UpsampleSampler` with the run's weights, upsampling, target_ratio and
    min_positives), of them positive, their share of the epoch, the validation images and
    positives."""
    from rsna_utils.learn.samplers import UpsampleSampler
    labels = train["cancer"].to_numpy(np.float32)
    w = row_weights(train, cfg.source_weights, str(cfg.csv))
    src_train, src_val = sources_of(train).to_numpy(), sources_of(val).to_numpy()
    # what the sampler draws: images, or breasts (a breast-level model's items, its views' rows)
    if getattr(cfg, "level", "image") == "breast":
        groups = pd.Series(np.arange(len(train))).groupby(train["prediction_id"].to_numpy(),
                                                          sort=False)
        first = np.array([g.iloc[0] for _, g in groups], dtype=np.int64)
        item_labels = train["cancer"].groupby(train["prediction_id"].to_numpy(),
                                              sort=False).max().to_numpy(np.float32)
    else:
        first, item_labels = np.arange(len(train)), labels
    item_w = None if w is None else w[first]
    draws = np.zeros(len(first))
    if len(first):
        s = UpsampleSampler(item_labels, cfg.seed, cfg.upsample,
                            cfg.target_ratio if cfg.upsample == 1.0 else None,
                            batch_size=cfg.batch_size, min_positives=cfg.min_positives,
                            weights=item_w)
        for e in range(DRAW_EPOCHS):
            s.set_epoch(e)
            draws += np.bincount(s._indices(), minlength=len(first))
        draws /= DRAW_EPOCHS
    pos_draws = np.where(item_labels > 0.5, draws, 0.0)
    src_item = src_train[first]
    total = draws.sum()
    rows = []
    for name in sorted(set(src_train) | set(src_val), key=lambda n: (n != "rsna", n)):
        t, v, it = src_train == name, src_val == name, src_item == name
        sites = sorted({int(x) for x in pd.concat([train.loc[t, "site_id"], val.loc[v, "site_id"]])
                        .dropna()}) if has_sites(train) or has_sites(val) else []
        rows.append({"source": name, "sites": " ".join(map(str, sites)),
                     "train_images": int(t.sum()), "train_positives": int((labels[t] > 0.5).sum()),
                     "weight": float(w[t][0]) if w is not None and t.any() else 1.0,
                     "draws_per_epoch": float(draws[it].sum()),
                     "positive_draws_per_epoch": float(pos_draws[it].sum()),
                     "epoch_share": float(draws[it].sum() / total) if total else float("nan"),
                     "val_images": int(v.sum()),
                     "val_positives": int((val.loc[v, "cancer"] > 0.5).sum())})
    return pd.DataFrame(rows, columns=SOURCE_COLUMNS)


def source_lines(table: pd.DataFrame) -> list[str]:
    """One line per source, as `rsna train` prints them before the first step."""
    lines = []
    for r in table.itertuples():
        sites = f" (site {r.sites})" if r.sites else ""
        lines.append(f"source {r.source}{sites}: {r.train_images} training images, "
                     f"{r.train_positives} positive; weight {r.weight:g}: {r.draws_per_epoch:.1f} "
                     f"draws an epoch ({r.positive_draws_per_epoch:.1f} positive), "
                     f"{r.epoch_share:.1%} of the epoch; {r.val_images} validation images, "
                     f"{r.val_positives} positive")
    return lines


def check_weights(train: pd.DataFrame, cfg) -> None:
    """Weights that leave training without an image, or without a positive drawn in every
    epoch where batches need one, are refused with the fix; a weight for a source the table
    lacks is a note."""
    w = row_weights(train, cfg.source_weights, str(cfg.csv))
    if w is None:
        return
    present = set(sources_of(train)) | {str(int(s)) for s in train["site_id"].dropna().unique()}
    absent = [k for k in cfg.source_weights if k not in present]
    if absent:
        print(f"note: source_weights names {', '.join(absent)}, absent from the training images "
              f"of {cfg.csv}", file=sys.stderr)
    if w.sum() == 0:
        raise RsnaError(f"source_weights={cfg.source_weights}: every training image has weight 0; "
                        "give at least one source a weight above 0")
    pos_mass = w[train["cancer"].to_numpy() > 0.5].sum()
    if pos_mass == 0:
        raise RsnaError(f"source_weights={cfg.source_weights}: every positive training image has "
                        "weight 0, so the model would never see a cancer; raise the weight of a "
                        "source with positives")
    if cfg.min_positives and pos_mass < 1:
        raise RsnaError(f"source_weights={cfg.source_weights}: the positives' weights add up to "
                        f"{pos_mass:g}, so some epochs draw none, and min_positives="
                        f"{cfg.min_positives} needs one in every batch; raise those sources' "
                        "weights or set min_positives 0")


def report_sources(train: pd.DataFrame, val: pd.DataFrame, cfg,
                   out: Path) -> pd.DataFrame | None:
    """For a table with sources (site_id): the weights checked, one line per source printed,
    out/sources.csv written. Returns the table (None without site_id)."""
    check_weights(train, cfg)
    if not (has_sites(train) or has_sites(val)):
        return None
    table = source_table(train, val, cfg)
    for line in source_lines(table):
        print(line, flush=True)        # the run's log (stdout), not a warning
    write_atomic(Path(out) / SOURCES_FILE, table.to_csv(index=False))
    return table


def source_auc(preds: pd.DataFrame) -> dict[str, tuple[int, int, float]]:
    """{source: (breasts, positive breasts, breast AUC of the mean of views)} of validation
    predictions (val_predictions.csv) that carry site_id; {} otherwise."""
    from rsna_utils.learn import metrics
    if not has_sites(preds) or not {"prediction", "cancer"} <= set(preds.columns):
        return {}
    out = {}
    for name, part in preds.groupby(sources_of(preds)):
        b = metrics.breast_level(part, "prediction", "cancer")
        y = b["cancer"].to_numpy()
        auc = (metrics.roc_auc(y, b["prediction"].fillna(0)) if 0 < y.sum() < len(y)
               else float("nan"))
        out[str(name)] = (len(b), int(y.sum()), float(auc))
    return out


def run_sources(run: str | Path) -> pd.DataFrame | None:
    """A training run's sources.csv with, where its val_predictions.csv holds several sources,
    each one's validation breast AUC (`val_breast_auc`); None without sources.csv."""
    run = Path(run)
    try:
        table = pd.read_csv(run / SOURCES_FILE)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    try:
        aucs = source_auc(pd.read_csv(run / "val_predictions.csv"))
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        aucs = {}
    if len(aucs) > 1:
        table["val_breast_auc"] = table["source"].map({k: v[2] for k, v in aucs.items()})
    return table
