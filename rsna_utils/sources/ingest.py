"""Public mammography datasets turned into the RSNA shape (`rsna ingest`).

Each adapter reads a dataset in the layout its publisher distributes and writes, in OUT:

- `train.csv`: the competition's columns and types (`core.table.TRAIN_COLUMNS`), one row per image;
  a value the source does not record is empty (as RSNA's own age, BIRADS and density can be);
- `train_images/{patient_id}/{image_id}.dcm`: a symbolic link to the source's file (a copy where
  the file system refuses links), so `rsna preprocess --images OUT/train_images --csv
  OUT/train.csv` and `learn.data.load_table` read it unchanged;
- `id_map.csv`: the source's string ids and the integers they became (kind, source_id, id);
- `unmapped.csv`: every source row or file that did not become an image, with its reason
  (`where`, `item`, `reason`, `detail`): nothing is dropped without a word;
- `ingest.json`: the format, the source folder and tables, the counts, site_id and the label
  mapping written out in words; `boxes.csv` where the source has lesion boxes (VinDr).

The adapters live one per module (`ingest_cbis`, `ingest_vindr`, `ingest_cmmd`, what they share
in `ingest_adapters`); this module runs one (`ingest`), writes the folder, and `combine`s them.

Ids: the source's string id (CBIS-DDSM's `P_00001`, VinDr's hex study and image ids, CMMD's
`D1-0001`) becomes `site_id * 10**12 + (sha1 of the string) mod 10**12`: the same file gets the
same id on every run and from any subset, and each source owns its own range, above every RSNA
id (< 2**31), so ingested folders and the competition's data combine without collisions.

Sites (`site_id`; RSNA's own are 1 and 2): CBIS-DDSM 101, VinDr-Mammo 102, CMMD 103. No source
records the machine as RSNA does: `machine_id` is the site_id (one "machine" per source).
`implant` is 0 (none of them records implants).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import SPACE_FIX, RsnaError, atomic_folder, writing
from rsna_utils.core.table import SOURCE_SITES, TRAIN_COLUMNS, dicom_path
# the adapters, one module each, and what they share; their names kept here for callers
from rsna_utils.sources.ingest_adapters import (  # noqa: F401
    BOX_COLUMNS, ROW_COLUMNS, UNMAPPED_COLUMNS, Format, Read, _num, _read_table, _table, _tables,
    found, unmapped, wrong_layout)
from rsna_utils.sources.ingest_cbis import (  # noqa: F401
    CBIS_LABELS, CBIS_LAYOUT, CBIS_NEEDS, CBIS_PATHOLOGY, CBIS_SUBJECT, read_cbis)
from rsna_utils.sources.ingest_cmmd import (  # noqa: F401
    CMMD_ID, CMMD_LABELS, CMMD_LAYOUT, CMMD_NEEDS, CMMD_TABLE, CMMD_VIEWS, read_cmmd)
from rsna_utils.sources.ingest_vindr import (  # noqa: F401
    VINDR_BOX_NEEDS, VINDR_BREAST, VINDR_FINDINGS, VINDR_LABELS, VINDR_LAYOUT, VINDR_NEEDS,
    read_vindr)

INGEST_FILE = "ingest.json"
ID_RANGE = 10**12


FORMATS = {f.name: f for f in (
    Format("cbis-ddsm", SOURCE_SITES["cbis-ddsm"][0], read_cbis, CBIS_LAYOUT, CBIS_LABELS),
    Format("vindr", SOURCE_SITES["vindr"][0], read_vindr, VINDR_LAYOUT, VINDR_LABELS),
    Format("cmmd", SOURCE_SITES["cmmd"][0], read_cmmd, CMMD_LAYOUT, CMMD_LABELS),
)}


# ----------------------------------------------------------------------------------------
# Shared: ids, the table, links, the output folder
# ----------------------------------------------------------------------------------------

def stable_ids(texts: pd.Series, site_id: int, kind: str, fmt: str) -> pd.Series:
    """site_id * 10**12 + sha1(format:kind:text) mod 10**12, as int64. Two texts that meet
    on one id (about 1 in 10**5 for 20,000 images) are an error rather than one image."""
    def one(s: str) -> int:
        return int(hashlib.sha1(f"{fmt}:{kind}:{s}".encode()).hexdigest(), 16) % ID_RANGE
    uniq = pd.unique(texts)
    ids = pd.Series([site_id * ID_RANGE + one(str(s)) for s in uniq], index=uniq, dtype="int64")
    clash = ids[ids.duplicated(keep=False)]
    if len(clash):
        raise RsnaError(f"{kind} ids {list(clash.index[:2])} hash to the same id {clash.iloc[0]}; "
                        "report it: the id scheme (rsna_utils/sources/ingest.py) needs a wider "
                        "range")
    return texts.map(ids).astype("int64")


def rsna_table(r: Read, fmt: Format) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train.csv's rows with a `path` column, id_map) from an adapter's images."""
    d = r.images.copy()
    d["patient_id"] = stable_ids(d.patient, fmt.site_id, "patient", fmt.name)
    d["image_id"] = stable_ids(d.image, fmt.site_id, "image", fmt.name)
    d["site_id"] = d["machine_id"] = fmt.site_id
    d["implant"] = 0
    d = d.astype({"age": "float64", "cancer": "int64", "biopsy": "Int64", "invasive": "Int64",
                  "BIRADS": "float64", "difficult_negative_case": "boolean"})
    d = d.sort_values(["patient_id", "laterality", "view", "image_id"]).reset_index(drop=True)
    id_map = pd.concat([
        pd.DataFrame({"kind": "patient", "source_id": d.patient, "id": d.patient_id}),
        pd.DataFrame({"kind": "image", "source_id": d.image, "id": d.image_id})]
    ).drop_duplicates()
    return d[[*TRAIN_COLUMNS, "path"]], id_map


def link(src: str | Path, dst: Path) -> str:
    """dst -> src as a symbolic link ("symlink"), else a copy ("copy")."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.realpath(src), dst)
        return "symlink"
    except OSError:
        with writing(dst, "copying an image", SPACE_FIX):
            shutil.copyfile(src, dst)
        return "copy"


def link_images(table: pd.DataFrame, out: Path, progress: bool, desc: str) -> dict:
    """train_images/{patient_id}/{image_id}.dcm for every row; the counts by kind of link."""
    from tqdm.auto import tqdm
    kinds = {"symlink": 0, "copy": 0}
    rows = zip(table.path, table.patient_id, table.image_id)
    for path, pid, iid in tqdm(rows, total=len(table), desc=desc, unit="img",
                               disable=not progress, file=sys.stderr):
        kinds[link(path, dicom_path(out / "train_images", pid, iid))] += 1
    return kinds


def check_out(out: Path) -> None:
    """OUT is replaced whole: refused when it holds anything `rsna ingest` did not make."""
    if out.is_dir() and any(out.iterdir()) and not (out / INGEST_FILE).is_file():
        raise RsnaError(f"{out}: not empty and not made by `rsna ingest` (no {INGEST_FILE}); "
                        "give --out a new or empty folder (an earlier ingest's is replaced)")
    if out.exists() and not out.is_dir():
        raise RsnaError(f"{out}: a file, not a folder; give --out a folder")


def counts(table: pd.DataFrame, lost: pd.DataFrame) -> dict:
    breasts = table.groupby(["patient_id", "laterality"]).cancer.max()
    return dict(images=len(table), patients=int(table.patient_id.nunique()),
                positive_images=int(table.cancer.sum()), breasts=len(breasts),
                positive_breasts=int(breasts.sum()), unmapped=len(lost),
                unmapped_by_reason={k: int(v) for k, v in lost.reason.value_counts().items()})


def write_folder(tmp: Path, table: pd.DataFrame, lost: list[dict], info: dict,
                 extra: dict[str, pd.DataFrame], progress: bool, desc: str) -> dict:
    """Links, train.csv, unmapped.csv, the extra tables and ingest.json into `tmp`."""
    lost_df = pd.DataFrame(lost, columns=UNMAPPED_COLUMNS)
    info = {**info, **counts(table, lost_df),
            "links": link_images(table, tmp, progress, desc)}
    table.drop(columns="path").to_csv(tmp / "train.csv", index=False)
    lost_df.to_csv(tmp / "unmapped.csv", index=False)
    for name, df in extra.items():
        df.to_csv(tmp / name, index=False)
    (tmp / INGEST_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def ingest(fmt: str, src: str | Path, out: str | Path, meta: str | Path | None = None,
           progress: bool = True) -> dict:
    """Read the dataset at `src` in format `fmt` (FORMATS) and write the RSNA-shaped folder
    `out` (replaced whole; see the module's docstring). `meta`: where the source's tables are
    when not in `src` (a file or a folder). Returns what ingest.json holds."""
    if fmt not in FORMATS:
        raise RsnaError(f"--format {fmt!r}: not known; choose {', '.join(FORMATS)}")
    f, src, out = FORMATS[fmt], Path(src), Path(out)
    if not src.is_dir():
        raise RsnaError(f"{src}: folder not found; point --src at the {fmt} dataset ({f.layout})")
    check_out(out)
    r = f.read(src, Path(meta) if meta is not None else None, progress)
    if r.images.empty:
        raise RsnaError(f"{src}: no image could be mapped ({len(r.unmapped)} unmapped, e.g. "
                        f"{r.unmapped[0]['item'] if r.unmapped else '-'}: "
                        f"{r.unmapped[0]['reason'] if r.unmapped else '-'}); expected {f.layout}")
    twice = r.images.image.duplicated()
    r.unmapped += [unmapped(p, i, "listed twice", "the same image id on another row; kept the "
                            "first") for p, i in zip(r.images.path[twice], r.images.image[twice])]
    r.images = r.images[~twice]
    table, id_map = rsna_table(r, f)
    extra = {"id_map.csv": id_map, **{k: _with_ids(v, id_map) for k, v in r.extra.items()}}
    info = dict(format=fmt, source=str(src.resolve()), tables=r.tables, site_id=f.site_id,
                labels=f.labels, ids="site_id * 10**12 + sha1(format:kind:source id) mod 10**12 "
                "(id_map.csv)", **r.notes)
    with atomic_folder(out) as tmp:
        info = write_folder(tmp, table, r.unmapped, info, extra, progress, f"ingest {fmt}")
    return {**info, "out": str(out)}


def _with_ids(df: pd.DataFrame, id_map: pd.DataFrame) -> pd.DataFrame:
    """An extra table's source `image` ids replaced by the ingested image_id."""
    ids = id_map[id_map.kind == "image"].set_index("source_id").id
    return df.assign(image=df.image.map(ids).astype("int64")).rename(columns={"image": "image_id"})


# ----------------------------------------------------------------------------------------
# Combining ingested (or RSNA-shaped) folders
# ----------------------------------------------------------------------------------------

def _read_part(part: Path) -> pd.DataFrame:
    csv = part / "train.csv"
    if not csv.is_file():
        raise RsnaError(f"{csv}: not found; each folder to combine needs train.csv and "
                        "train_images/ (an `rsna ingest` output or an RSNA-shaped dataset)")
    t = pd.read_csv(csv)
    lacking = [c for c in TRAIN_COLUMNS if c not in t.columns]
    if lacking:
        raise RsnaError(f"{csv}: lacks column(s) {lacking}; expected the competition's train.csv "
                        "columns")
    t = t[TRAIN_COLUMNS].assign(part=str(part))
    t["path"] = [str(dicom_path(part / "train_images", p, i))
                 for p, i in zip(t.patient_id, t.image_id)]
    return t


def _refuse_collisions(tables: list[pd.DataFrame]) -> None:
    """An image_id or a patient_id in two folders is refused, naming both and the id."""
    for col in ("image_id", "patient_id"):
        owner: dict = {}
        for t in tables:
            for v in pd.unique(t[col]):
                if v in owner:
                    raise RsnaError(f"{t.part.iloc[0]}/train.csv: {col} {v} is also in "
                                    f"{owner[v]}/train.csv; ids must be unique across the "
                                    "combined folders: leave one out or re-ingest it")
            owner.update(dict.fromkeys(pd.unique(t[col]), t.part.iloc[0]))


def _concat_extra(parts: list[Path], name: str) -> pd.DataFrame | None:
    found_ = [pd.read_csv(p / name).assign(part=str(p)) for p in parts if (p / name).is_file()]
    return pd.concat(found_, ignore_index=True) if found_ else None


def combine(out: str | Path, parts: list[str | Path], progress: bool = True) -> dict:
    """One RSNA-shaped folder (train.csv, train_images links) from several ingested or
    RSNA-shaped folders. Colliding image_ids or patient_ids are refused; an image listed but
    absent is unmapped. boxes.csv, id_map.csv and unmapped.csv of the parts are concatenated
    (with a `part` column)."""
    out, parts = Path(out), [Path(p) for p in parts]
    if len(parts) < 2:
        raise RsnaError("--combine: give two or more folders to combine")
    if len({p.resolve() for p in parts}) < len(parts):
        raise RsnaError(f"--combine {' '.join(map(str, parts))}: a folder is given twice")
    check_out(out)
    tables = [_read_part(p) for p in parts]
    _refuse_collisions(tables)
    t = pd.concat(tables, ignore_index=True)
    here = np.array([os.path.exists(p) for p in t.path], dtype=bool)
    lost = [unmapped(r.part, r.image_id, "file not found", f"no {r.path}")
            for r in t[~here].itertuples()]
    extra = {n: df for n in ("boxes.csv", "id_map.csv", "unmapped.csv")
             if (df := _concat_extra(parts, n)) is not None}
    if "unmapped.csv" in extra:     # the parts' own unmapped rows, and this step's
        earlier = extra.pop("unmapped.csv").fillna("")
        earlier["where"] = earlier.part + ": " + earlier["where"].astype(str)
        lost = earlier[UNMAPPED_COLUMNS].to_dict("records") + lost
    info = dict(format="combined", parts=[str(p.resolve()) for p in parts],
                site_ids=sorted(int(s) for s in t.site_id.unique()))
    with atomic_folder(out) as tmp:
        info = write_folder(tmp, t[here].drop(columns="part"), lost, info, extra, progress,
                            "combine")
    return {**info, "out": str(out)}
