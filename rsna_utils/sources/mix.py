"""A plan's `sources:` (issue 31): the sources listed, checked, and combined into one
RSNA-shaped folder by `ingest.combine` before the plan's first step; their weights become the
training steps' `source_weights`. What training does with the mix: `learn.mix`."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import SOURCE_SITES


def _known() -> str:
    return ", ".join(SOURCE_SITES)


# ----------------------------------------------------------------------------------------
# A plan's sources
# ----------------------------------------------------------------------------------------

SOURCE_KEYS = {"name", "dir", "images", "csv", "weight", "optional"}


def check_plan_sources(sources, where: str) -> list[dict]:
    """A plan's `sources:` list: each a mapping with a known `name`, either `dir` (a folder
    with train.csv and train_images/) or `images` and `csv`, and an optional `weight` >= 0.
    Returns the entries with `weight` filled (1)."""
    eg = ("e.g. sources: [{name: rsna, dir: \"{data}\"}, {name: cbis-ddsm, images: "
          "data/cbis/train_images, csv: data/cbis/train.csv, weight: 0.5}]")
    if not isinstance(sources, list) or len(sources) < 2:
        raise RsnaError(f"{where}: sources must list two or more sources to mix (for one, point "
                        f"--data at it and leave sources out); {eg}")
    out, seen = [], set()
    for k, s in enumerate(sources):
        if not isinstance(s, dict) or "name" not in s:
            raise RsnaError(f"{where}: sources[{k}] = {s!r} needs a name; {eg}")
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            raise RsnaError(f"{where}: sources[{k}] has unknown key(s) {sorted(unknown)}; give "
                            f"{', '.join(sorted(SOURCE_KEYS))}")
        name = str(s["name"]).strip().lower()
        if name not in SOURCE_SITES:
            raise RsnaError(f"{where}: sources[{k}] name {s['name']!r} is not a source; use one of "
                            f"{_known()}")
        if name in seen:
            raise RsnaError(f"{where}: source {name} is listed twice; list each source once")
        seen.add(name)
        if ("dir" in s) == ("images" in s or "csv" in s) or ("dir" not in s and not (
                "images" in s and "csv" in s)):
            raise RsnaError(f"{where}: source {name}: give either dir (a folder with train.csv and "
                            "train_images/) or both images and csv")
        try:
            weight = float(s.get("weight", 1))
        except (TypeError, ValueError):
            weight = None
        if weight is None or not (0 < weight < math.inf):
            raise RsnaError(f"{where}: source {name} has weight {s.get('weight')!r}; a plan's "
                            "source trains at a weight above 0 (0.5: half as often as an RSNA "
                            "image): give a number above 0, or remove the entry")
        out.append({**s, "name": name, "weight": weight})
    return out


def present_sources(sources: list[dict], require: bool = False, say=print) -> list[dict] | None:
    """The plan's sources (resolved paths) whose folder is at hand. An `optional: true` source
    whose folder is missing is skipped with one line (`require`: an RsnaError instead); a
    missing required one is left for `combine_sources` to name. None when fewer than two remain:
    the plan trains on its data alone."""
    kept = []
    for s in sources:
        where = Path(s["dir"]) if "dir" in s else Path(s["images"])
        if s.get("optional") and not where.exists():
            if require:
                raise RsnaError(f"source {s['name']}: {where} not found; ingest it there "
                                f"(`rsna ingest --format {s['name']} --out {where}`), or run "
                                "without --require-sources to train without it")
            say(f"source {s['name']}: {where} not found; skipped (train without it; "
                "--require-sources stops instead)")
            continue
        kept.append(s)
    return kept if len(kept) >= 2 else None


def plan_weights(sources: list[dict]) -> dict[str, float]:
    """The `source_weights` a plan's sources give the training steps."""
    return {s["name"]: float(s["weight"]) for s in sources}


def _source_folder(s: dict, staging: Path) -> Path:
    """A folder that `ingest.combine` reads for one source: its `dir`, or, for images and csv
    given apart, a staging folder with a copy of the CSV and a link to the images."""
    if "dir" in s:
        d = Path(s["dir"])
        if not (d / "train.csv").is_file():
            raise RsnaError(f"source {s['name']}: {d / 'train.csv'} not found; dir must hold "
                            "train.csv and train_images/ (an `rsna ingest` output or the "
                            "competition's folder)")
        return d
    images, csv = Path(s["images"]), Path(s["csv"])
    if not csv.is_file():
        raise RsnaError(f"source {s['name']}: csv {csv} not found; give its train.csv")
    if not images.is_dir():
        raise RsnaError(f"source {s['name']}: images {images} is not a folder; give the folder "
                        "holding {patient_id}/{image_id}.dcm")
    if images.name == "train_images" and csv.parent == images.parent and csv.name == "train.csv":
        return csv.parent
    d = staging / s["name"]
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / "train.csv", csv.read_text())
    link = d / "train_images"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(images.resolve(), target_is_directory=True)
    return d


def _check_sites(s: dict, folder: Path) -> None:
    """The source's train.csv holds the sites its name stands for."""
    sites = pd.read_csv(folder / "train.csv", usecols=["site_id"])["site_id"].dropna()
    want = SOURCE_SITES[s["name"]]
    other = sorted(int(x) for x in set(sites.unique()) - set(want))
    if other:
        raise RsnaError(f"source {s['name']}: {folder / 'train.csv'} has site_id {other}, not "
                        f"{s['name']}'s {list(want)}; name the source after its sites (ingested "
                        "folders: their --format)")


def combine_sources(sources: list[dict], out: str | Path, progress: bool = True) -> Path:
    """The plan's sources as one RSNA-shaped folder `out` (train.csv, train_images/) made by
    `ingest.combine` (replaced whole; an earlier combine's is). Returns `out`."""
    from rsna_utils.sources.ingest import combine
    out = Path(out)
    staging = out.parent / (out.name + "-staging")
    folders = [_source_folder(s, staging) for s in sources]
    for s, f in zip(sources, folders):
        _check_sites(s, f)
    combine(out, folders, progress=progress)
    return out
