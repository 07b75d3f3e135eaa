"""What the `rsna ingest` adapters share: the rows an adapter returns (`Read`), a format's
description (`Format`), unmapped rows, the wrong-layout error, and reading the source's tables."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from rsna_utils.core.errors import RsnaError

UNMAPPED_COLUMNS = ["where", "item", "reason", "detail"]
BOX_COLUMNS = ["image_id", "xmin", "ymin", "xmax", "ymax", "category", "finding_birads"]
# what an adapter's reader returns per image, before ids and site columns are added
ROW_COLUMNS = ["patient", "image", "path", "laterality", "view", "age", "cancer", "biopsy",
               "invasive", "BIRADS", "density", "difficult_negative_case"]


@dataclass
class Read:
    """What one adapter read: images (ROW_COLUMNS; `patient` and `image` the source's string
    ids, `path` the file), unmapped rows (UNMAPPED_COLUMNS), extra tables keyed by file name
    (their `image` column holds source image ids), the tables read, notes for ingest.json."""
    images: pd.DataFrame
    unmapped: list[dict] = field(default_factory=list)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@dataclass
class Format:
    name: str
    site_id: int
    read: Callable[[Path, Path | None, bool], Read]
    layout: str                     # the expected layout, in the words of an error
    labels: dict[str, str]          # column -> the mapping in words (ingest.json)


def unmapped(where, item, reason: str, detail: str = "") -> dict:
    return dict(where=str(where), item=str(item), reason=reason, detail=detail)


def found(folder: Path, n: int = 6) -> str:
    """The first entries of `folder`, for an error that says what was there instead."""
    if not folder.is_dir():
        return "no such folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    return ", ".join(names[:n]) + (f" ... ({len(names)} entries)" if len(names) > n else "")


def wrong_layout(fmt: str, src: Path, layout: str, what: str) -> RsnaError:
    return RsnaError(f"{src}: {what}, so this is not a {fmt} folder: expected {layout}; found "
                     f"{found(src)}. Point --src at the dataset's folder (or pick its --format)")


def _num(v) -> float:
    """The number in '4', 4, 'BI-RADS 4'; NaN where there is none."""
    m = re.search(r"\d+(\.\d+)?", str(v)) if v is not None else None
    return float(m.group()) if m else float("nan")


def _tables(folders: list[Path], meta: Path | None, pattern: str) -> list[Path]:
    """Files matching `pattern` in --meta (a file, or a folder), else in `folders`."""
    if meta is not None:
        return [meta] if meta.is_file() else sorted(meta.glob(pattern))
    return sorted({p for d in folders for p in d.glob(pattern)})


def _read_table(path: Path, needs: tuple, what: str) -> pd.DataFrame:
    try:
        t = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RsnaError(f"{path}: not a readable CSV ({e}); expected {what}") from None
    lacking = [c for c in needs if c not in t.columns]
    if lacking:
        raise RsnaError(f"{path}: lacks column(s) {lacking}; expected {what} (columns "
                        f"{', '.join(needs)} ...)")
    return t


def _table(src: Path, meta: Path | None, name: str) -> Path | None:
    """`name` in --meta (a folder, or a folder holding it) or in src; None if absent."""
    for d in ([meta if meta.is_dir() else meta.parent] if meta is not None else []) + [src]:
        if (d / name).is_file():
            return d / name
    return None
