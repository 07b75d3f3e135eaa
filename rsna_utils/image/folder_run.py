"""The bookkeeping of a preprocessing run over a folder, shared by the CPU (`Preprocessor`) and
GPU (`GpuPreprocessor`) runners: the images to do (a CSV or a folder scan, one shard of them),
the settings file beside the PNGs, resume (what meta*.csv says is done), the two CSV logs
(meta.csv, failures.csv), the disk-space estimate and the run's summary (`FolderRun`).
"""
from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rsna_utils.core.errors import DiskFullError, RsnaError, free_bytes, human_bytes, write_atomic, writing
from rsna_utils.core.table import DICOM_GLOB, dicom_path, png_path
from rsna_utils.image.convert import PNG_SPACE_FIX, PreprocessConfig, with_later_settings

# meta.csv: one row per image written
META_CSV_COLUMNS = ["image_id", "patient_id", "png", "rows", "columns", "transfer_syntax",
                    "photometric", "crop_y0", "crop_x0", "crop_y1", "crop_x1", "flipped",
                    "window", "window_note", "looks_inverted", "backend", "gpu_route",
                    "decode_ms", "total_ms", "crop_reason"]
FAILURE_COLUMNS = ["image_id", "patient_id", "path", "reason"]


@dataclass
class Item:
    image_id: str
    patient_id: str
    path: str
    png: str
    problem: str = ""        # set when the CSV row itself is unusable


def list_items(images: str | Path, csv_path: str | Path | None, out: str | Path,
               shard: tuple[int, int] = (0, 1)) -> list[Item]:
    """The images to process: from the CSV (patient_id, image_id) or a folder scan."""
    images, out = Path(images), Path(out)
    k, n = shard
    items: list[Item] = []
    if csv_path is not None:
        try:
            df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise RsnaError(f"{csv_path}: CSV not found; pass the train.csv/test.csv path") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise RsnaError(f"{csv_path}: not a readable CSV ({e})") from None
        missing = {"patient_id", "image_id"} - set(df.columns)
        if missing:
            raise RsnaError(f"{csv_path}: missing column(s) {sorted(missing)}; the CSV needs "
                            "patient_id and image_id as in the Kaggle train.csv")
        for i, (pid, iid) in enumerate(zip(df["patient_id"].str.strip(),
                                           df["image_id"].str.strip())):
            ok = pid.isdigit() and iid.isdigit()
            key = int(iid) if iid.isdigit() else i
            if key % n != k:
                continue
            if not ok:
                items.append(Item(iid or f"row{i + 2}", pid, "", "",
                                  f"{csv_path} line {i + 2}: patient_id {pid!r} / image_id "
                                  f"{iid!r} is missing or not a number; fix the row"))
                continue
            items.append(Item(iid, pid, str(dicom_path(images, pid, iid)),
                              str(png_path(out, pid, iid))))
    else:
        for p in sorted(images.glob(DICOM_GLOB)):
            iid, pid = p.stem, p.parent.name
            if (int(iid) if iid.isdigit() else hash(iid)) % n != k:
                continue
            items.append(Item(iid, pid, str(p), str(png_path(out, pid, iid))))
        if not items and not any(images.glob(DICOM_GLOB)):
            raise RsnaError(f"{images}: no */*.dcm files; point --images at the folder that "
                            "holds {patient_id}/{image_id}.dcm")
    return items


class _CsvLog:
    """Append rows to a CSV, flushing each; repairs a last line cut by a kill."""

    def __init__(self, path: Path, columns: list[str], fresh: bool = False):
        self.path, self.columns = path, columns
        if fresh and path.exists():
            path.unlink()
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as fh:
                data = fh.read()
                if not data.endswith(b"\n"):
                    fh.truncate(data.rfind(b"\n") + 1)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header and header != columns:
                if set(header) < set(columns):  # from an older version: gain the new columns
                    self._rewrite(path, columns)
                else:                           # otherwise keep its columns (rows stay aligned)
                    self.columns = columns = header
        self.fh = open(path, "a", newline="")
        self.w = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore")
        if new:
            self.w.writeheader()

    @staticmethod
    def _rewrite(path: Path, columns: list[str]) -> None:
        """The file's rows under `columns` (blank where it had none), replaced atomically."""
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        write_atomic(path, write, PNG_SPACE_FIX)

    def write(self, row: dict) -> None:
        with writing(self.path, "adding a row", PNG_SPACE_FIX):    # a cut row is repaired on reopening
            self.w.writerow(row)
            self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def load_done(out: Path) -> set[str]:
    """image_ids with a meta row and a PNG on disk (meta*.csv: all shards)."""
    done: set[str] = set()
    for m in out.glob("meta*.csv"):
        try:
            df = pd.read_csv(m, dtype=str, usecols=["image_id", "png"], on_bad_lines="skip")
        except (pd.errors.EmptyDataError, ValueError):
            continue
        for iid, png in zip(df["image_id"], df["png"]):
            if isinstance(png, str) and os.path.exists(out / png):
                done.add(iid)
    return done


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise RsnaError(f"--shard {text!r}: write K/N, e.g. 0/4 for the first of four") from None
    if n < 1 or not 0 <= k < n:
        raise RsnaError(f"--shard {text!r}: need 0 <= K < N (K counts from 0)")
    return k, n


@dataclass
class RunSummary:
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    out: str = ""
    failures: list = field(default_factory=list)
    fallbacks: int = 0          # GPU runs: files that went through the CPU path
    inverted: int = 0           # images white at their edges after windowing (negatives)
    inverted_policy: str = "warn"

    def line(self, extra: str = "") -> str:
        """One line (and a second one when images look inverted); `extra` ends the first."""
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (f"preprocessed {self.processed} images, skipped {self.skipped} already done, "
                f"{self.failed} failed{' (see failures.csv)' if self.failed else ''} "
                f"in {self.seconds:.1f} s "
                f"({rate:.2f} img/s); output in {self.out}{extra}" + self.inverted_line())

    def inverted_line(self) -> str:
        if not self.inverted:
            return ""
        if self.inverted_policy == "fix":
            return (f"\n{self.inverted} image(s) were white at their edges after windowing and "
                    "were inverted (meta.csv: looks_inverted)")
        return (f"\nwarning: {self.inverted} image(s) look inverted: white at the edges after "
                "windowing, where a mammogram's background is black (meta.csv: looks_inverted). "
                "Their PhotometricInterpretation may not match their pixels; look at a few, and "
                "if they are negatives rerun into a new --out with --inverted fix")


def open_run(out: str | Path, cfg: PreprocessConfig, images, csv_path, shard):
    """What every preprocessing run (CPU or GPU) starts with: the output folder, its settings
    file, the shard's items minus those already done, and the two logs.
    Returns (todo, summary, meta_log, fail_log)."""
    from rsna_utils.dicom.reader import check_dicom_folder, check_listed_files
    check_dicom_folder(images)        # before anything is written
    out = Path(out)
    k, n = shard if isinstance(shard, tuple) else parse_shard(shard)
    items = list_items(images, csv_path, out, (k, n))     # reads only: the CSV, a folder scan
    if csv_path is not None:          # a CSV of another folder: one line, no folder left behind
        check_listed_files(images, [it.path for it in items], csv_path)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out / "preprocess.json", cfg)
    suffix = "" if n == 1 else f".{k}-of-{n}"
    for stale in [*out.glob(".*.png.tmp*"), *out.glob("*.png.tmp*")]:   # left by a killed run (never under a final name)
        stale.unlink(missing_ok=True)
    meta_log = _CsvLog(out / f"meta{suffix}.csv", META_CSV_COLUMNS)   # repairs a cut last line
    done = load_done(out)
    todo = [it for it in items if it.image_id not in done]
    summary = RunSummary(skipped=len(items) - len(todo), out=str(out), inverted_policy=cfg.inverted)
    # failures of earlier runs are retried, so their rows are replaced; rows of images that
    # this run does not list (another CSV into the same folder, e.g. test after train) stay
    fpath = out / f"failures{suffix}.csv"
    keep = _other_failures(fpath, {it.image_id for it in items})
    fail_log = _CsvLog(fpath, FAILURE_COLUMNS, fresh=True)
    for row in keep:
        fail_log.write(row)
    return todo, summary, meta_log, fail_log


SPACE_CHECK_AFTER = 32      # PNGs written before the output's size is estimated


def space_warning(out: str | Path, bytes_per_png: float, todo: int) -> str:
    """A warning when the PNGs still to write will likely not fit on the disk of `out` (the
    estimate from the first images written), else ''."""
    need = bytes_per_png * max(todo - SPACE_CHECK_AFTER, 0)
    free = free_bytes(out)
    if free is None or need <= free:
        return ""
    return (f"warning: about {human_bytes(need)} of PNGs are still to be written to {out} and its "
            f"disk has {human_bytes(free)} free (estimated from the first {SPACE_CHECK_AFTER} "
            "images): the run will stop when the disk is full. Free some space or give --out a "
            "folder on a larger disk (Kaggle keeps at most 20 GB under /kaggle/working), or "
            "preprocess at a smaller --size")


class FolderRun:
    """The bookkeeping every preprocessing run over a folder shares, CPU or GPU: `open_run`
    (settings file, shard, resume, the two logs), the progress bar, a thread-safe `ok` / `fail`
    per image, and the summary. Use as a context manager; `summary` is complete on exit."""

    def __init__(self, out, cfg: PreprocessConfig, images, csv_path, shard, desc: str = "preprocess",
                 progress: bool = True):
        import threading

        from tqdm.auto import tqdm
        self.t0 = time.perf_counter()
        self.todo, self.summary, self.meta_log, self.fail_log = open_run(out, cfg, images,
                                                                         csv_path, shard)
        self._lock = threading.Lock()
        self.bar = tqdm(total=len(self.todo), desc=desc, unit="img", disable=not progress,
                        file=sys.stderr, dynamic_ncols=True)
        self.stopped: DiskFullError | None = None    # set by a writer thread; the run raises it
        self._png_bytes = 0
        self.space_warning = ""

    def ok(self, item: Item, meta: dict) -> None:
        with self._lock:
            self.meta_log.write(dict(meta, image_id=item.image_id, patient_id=item.patient_id,
                                     png=os.path.basename(item.png)))
            self.summary.processed += 1
            self.summary.inverted += bool(meta.get("looks_inverted"))
            if self.summary.processed <= SPACE_CHECK_AFTER:
                try:
                    self._png_bytes += os.path.getsize(item.png)
                except OSError:
                    pass
                if self.summary.processed == SPACE_CHECK_AFTER:
                    self.space_warning = space_warning(self.summary.out, self._png_bytes
                                                       / SPACE_CHECK_AFTER, len(self.todo))
                    if self.space_warning:
                        self.bar.write(self.space_warning, file=sys.stderr)

    def fail(self, item: Item, reason) -> None:
        row = dict(image_id=item.image_id, patient_id=item.patient_id, path=item.path,
                   reason=str(reason).replace("\n", " "))
        with self._lock:
            self.fail_log.write(row)
            self.summary.failures.append(row)
            self.summary.failed += 1
            self.bar.set_postfix(failed=self.summary.failed)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def __enter__(self) -> "FolderRun":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        for log in (self.meta_log, self.fail_log):
            try:
                log.close()
            except OSError:
                if exc[0] is None:    # leaving on an error (a full disk) already: that one
                    raise             # is the message; a row cut short is repaired on reopening
        self.summary.seconds = time.perf_counter() - self.t0


def _other_failures(path: Path, ids: set) -> list[dict]:
    if not path.exists():
        return []
    try:
        old = pd.read_csv(path, dtype=str).fillna("")
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return []
    if "image_id" not in old:
        return []
    ids = {str(i) for i in ids}
    return [r for r in old.to_dict("records") if r["image_id"] not in ids]


def _write_config(path: Path, cfg: PreprocessConfig) -> None:
    """The settings travel with the PNGs (training stores them in its checkpoints, inference
    reuses them); a rerun with other settings into the same folder is refused."""
    import json
    d = cfg.to_dict()
    if path.exists():
        old = with_later_settings(json.loads(path.read_text()))
        if old != d:
            diff = {k: (old.get(k), v) for k, v in d.items() if old.get(k) != v}
            raise RsnaError(f"{path.parent}: already holds images preprocessed with other settings "
                            f"{diff} (old, new); use another --out or the same settings")
        return
    write_atomic(path, json.dumps(d, indent=2), PNG_SPACE_FIX, doing="writing the settings")
