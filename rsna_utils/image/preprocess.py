"""DICOM -> windowed, cropped, resized PNG: one image (`preprocess_image`) and a whole folder
(`Preprocessor.run`: parallel, resumable, shardable, crash-contained).

Order of work per image, chosen for speed (see BENCHMARKS.md): decode; subsample the stored
values (every k-th pixel); plan the image from the header and the subsample (window and lookup
table, breast box, flip, geometry: `rsna_utils.image.plan`, shared with the GPU path); cut the
box out of the full-resolution stored values; area-resize the crop; window the small result.
Windowing after the area resize costs a few hundredths of a gray level on average against
windowing first (`window_first=True` does that, at about 20 ms more per large image).
"""
from __future__ import annotations

import csv
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rsna_utils.core.config import Config, setting
from rsna_utils.core.errors import DiskFullError, RsnaError, free_bytes, human_bytes, write_atomic, writing
from rsna_utils.core.sizes import MIN_SIDE, parse_size, size_flag
from rsna_utils.core.table import DICOM_GLOB, dicom_path, png_path
from rsna_utils.dicom.header import DEFAULT_MAX_PIXELS, read_header
from rsna_utils.dicom.reader import decode_pixels
from rsna_utils.image import roi
from rsna_utils.image.plan import PreprocessError, apply_numpy, make_plan

# meta.csv: one row per image written
META_CSV_COLUMNS = ["image_id", "patient_id", "png", "rows", "columns", "transfer_syntax",
                    "photometric", "crop_y0", "crop_x0", "crop_y1", "crop_x1", "flipped",
                    "window", "window_note", "looks_inverted", "backend", "gpu_route",
                    "decode_ms", "total_ms", "crop_reason"]
FAILURE_COLUMNS = ["image_id", "patient_id", "path", "reason"]


@dataclass
class PreprocessConfig(Config):
    """Everything that decides the output pixels: the `rsna preprocess` flags, notebook 02's
    parameters and the plans derive from these fields. Saved as preprocess.json beside the PNGs
    and in every checkpoint (inference reuses it)."""

    KIND = "preprocessing"

    size: tuple | list | int | str = setting(
        (512, 512), "output size: 512 or HEIGHTxWIDTH, e.g. 1024x512 (2:1 like the breast crop)",
        parse=size_flag())
    resize_mode: str = setting("pad", "pad: keep the crop's aspect ratio, black background; "
                               "stretch", choices=("stretch", "pad"))
    bits: int = setting(8, "PNG bit depth", choices=(8, 16))
    margin: float = setting(0.0, "grow the ROI box by this fraction on each side", ge=0)
    flip: str = setting("mass", "mirror so the chest wall is on the left: by pixel mass, by the "
                        "laterality tag, or none", choices=("none", "mass", "laterality"))
    window_index: int = setting(0, "which window / VOI LUT when a file has several", ge=0)
    prefer_lut: bool = setting(True, "a VOI LUT Sequence wins over the window (as pydicom)")
    window_first: bool = setting(False, "window at full resolution before resizing (slower)")
    roi_max_side: int = setting(512, "the breast ROI is found on a subsample this size", ge=16)
    crop: bool = setting(True, "crop to the breast ROI")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse headers declaring more pixels than "
                              "this", ge=1)
    inverted: str = setting("warn", "images white at their edges after windowing (a negative: "
                            "pixels that contradict their PhotometricInterpretation): warn (listed "
                            "in meta.csv and the summary) or fix (invert them)",
                            choices=("warn", "fix"))

    def __post_init__(self):
        self.size = parse_size(self.size, MIN_SIDE)
        if self.bits not in (8, 16):
            raise RsnaError(f"bits {self.bits}: PNG output is 8 or 16 bits")
        if self.resize_mode not in ("stretch", "pad"):
            raise RsnaError(f"resize_mode {self.resize_mode!r}: choose stretch or pad")
        if self.inverted not in ("warn", "fix"):
            raise RsnaError(f"inverted {self.inverted!r}: choose warn (keep the pixels, list the "
                            "image) or fix (invert images that are white at their edges)")
        if self.flip not in ("none", "mass", "laterality"):
            raise RsnaError(f"flip {self.flip!r}: choose none, mass or laterality")
        self.check_fields()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def preprocess_image(path: str | Path, cfg: PreprocessConfig, backend: str = "auto",
                     pixels: np.ndarray | None = None, header=None) -> tuple[np.ndarray, dict]:
    """One DICOM file to one output image (uint8 or uint16, shape cfg.size) and its metadata.

    `pixels`/`header` may be given when decoded elsewhere (the GPU path's CPU fallback).
    Raises RsnaError (DecodeError, PreprocessError) for files that cannot be used.
    """
    t0 = time.perf_counter()
    h = header or read_header(path)
    used = backend
    if pixels is None:
        pixels, used = decode_pixels(h, backend, cfg.max_pixels)
    t_dec = time.perf_counter()
    small = roi.subsample(pixels, cfg.roi_max_side)
    plan = make_plan(h, small, cfg, pixels.shape, lambda: pixels.min() == pixels.max())
    out = apply_numpy(pixels, plan)
    t1 = time.perf_counter()
    meta = dict(plan.meta(h), backend=used, decode_ms=round((t_dec - t0) * 1e3, 2),
                total_ms=round((t1 - t0) * 1e3, 2))
    return out, meta


def write_png(path: str | Path, img: np.ndarray, compression: int = 1) -> None:
    """Write atomically: a killed run never leaves a half-written PNG under the final name.

    zlib level 1, RLE strategy, SUB filter only: 2.1 ms for 512x512 against 3.6 ms for
    OpenCV's default (adaptive filters), with files about the same size (BENCHMARKS.md).
    """
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, compression,
                                         cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                                         cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB])
    if not ok:
        raise PreprocessError(f"{path}: PNG encoding failed")
    write_atomic(path, buf.tobytes(), PNG_SPACE_FIX, doing="writing the PNG")


PNG_SPACE_FIX = ("Free some space, or give --out a folder on a larger disk, and run the same "
                 "command again: the images already written are kept and skipped")


# ----------------------------------------------------------------------------------------
# A folder of images
# ----------------------------------------------------------------------------------------

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


# Worker state: each process keeps its config; set once by the pool initializer.
_CFG: PreprocessConfig | None = None
_BACKEND = "auto"
_COMPRESSION = 1
_HOOK = None


def _init_worker(cfg: PreprocessConfig, backend: str, compression: int, hook,
                 quiet: bool = False) -> None:
    global _CFG, _BACKEND, _COMPRESSION, _HOOK
    _CFG, _BACKEND, _COMPRESSION, _HOOK = cfg, backend, compression, hook
    from rsna_utils.core.warn import worker_warnings
    worker_warnings("preprocess", quiet)    # a decoder's warning: one line, none with --quiet
    cv2.setNumThreads(1)
    import faulthandler  # a crashing decoder is recorded in failures.csv; no stack dump
    faulthandler.disable()


def _work(item: Item) -> tuple[str, Item, dict | str]:
    """Process one item; never raises (everything becomes a failure reason)."""
    try:
        if item.problem:
            return "fail", item, item.problem
        if not os.path.exists(item.path):
            return "fail", item, f"{item.path}: file not found (listed in the CSV)"
        if _HOOK is not None:
            _HOOK(item.path)
        img, meta = preprocess_image(item.path, _CFG, _BACKEND)
        write_png(item.png, img, _COMPRESSION)
        return "ok", item, meta
    except DiskFullError as e:      # not this file's fault: the run stops
        return "stop", item, str(e)
    except RsnaError as e:
        return "fail", item, str(e)
    except MemoryError:
        return "fail", item, f"{item.path}: out of memory while processing"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a library bug on a strange file must cost one file, not the run
        return "fail", item, f"{item.path}: unhandled exception {type(e).__name__}: {e}"


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


class Preprocessor:
    """DICOM folder -> PNG folder with meta.csv and failures.csv.

    >>> Preprocessor(PreprocessConfig(size=512), workers=2).run("train_images", "train.csv", "png")
    """

    def __init__(self, cfg: PreprocessConfig | None = None, backend: str = "auto",
                 workers: int | None = None, png_compression: int = 1, progress: bool = True,
                 test_hook=None, file_timeout: float = 120.0):
        self.cfg = cfg or PreprocessConfig()
        self.backend = backend
        # workers=0 runs in this process (no crash containment); 1 or more use worker processes
        self.workers = (os.cpu_count() or 1) if workers is None else max(0, workers)
        self.png_compression = png_compression
        self.progress = progress
        self.test_hook = test_hook  # called with each path in the worker (crash tests)
        self.file_timeout = file_timeout  # seconds one file may take before its worker is killed

    def process(self, path: str | Path) -> tuple[np.ndarray, dict]:
        return preprocess_image(path, self.cfg, self.backend)

    def _pool(self, n: int) -> ProcessPoolExecutor:
        ctx = mp.get_context(_start_method())
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["rsna_utils.image.preprocess"])
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.cfg, self.backend, self.png_compression,
                                             self.test_hook, not self.progress))

    def _check_pool_starts(self) -> None:
        """A broken pool may mean the workers cannot start at all (then every file would be
        blamed): the usual cause is a script without a __main__ guard."""
        with self._pool(1) as ex:
            try:
                ex.submit(_noop).result(timeout=120)
            except BrokenProcessPool:
                raise RsnaError(
                    "worker processes could not start. From a Python script, put the call under "
                    "`if __name__ == \"__main__\":` (workers start with forkserver/spawn and "
                    "import the main script), or use workers=0") from None
        self._pool_checked = True

    def run(self, images: str | Path, csv_path: str | Path | None, out: str | Path,
            shard: str | tuple[int, int] | None = None) -> RunSummary:
        with FolderRun(out, self.cfg, images, csv_path, shard, "preprocess",
                       self.progress) as run:
            def record(status: str, item: Item, info) -> None:
                if status == "stop":
                    raise DiskFullError(info)
                (run.ok if status == "ok" else run.fail)(item, info)
                run.advance()

            if self.workers == 0:   # in this process: for debugging; a decoder crash ends the run
                _init_worker(self.cfg, self.backend, self.png_compression, None)
                for it in run.todo:
                    record(*_work(it))
            else:
                self._run_pool(run.todo, record)
        return run.summary

    def _run_pool(self, todo: list[Item], record) -> None:
        """Keep a bounded window of tasks in flight; when a worker dies (a decoder crash) or a
        task runs past the time limit (a decoder hang), the pool is torn down and the in-flight
        tasks rerun one at a time in a fresh process, which finds the culprit."""
        queue = list(reversed(todo))
        window = self.workers * 2
        while queue:
            suspects: list[Item] = []
            with self._pool(self.workers) as ex:
                running: dict = {}
                started: dict = {}
                while queue or running:
                    broken = False
                    while queue and len(running) < window:
                        it = queue.pop()
                        try:
                            fut = ex.submit(_work, it)
                        except BrokenProcessPool:   # a worker died since the last wait()
                            queue.append(it)        # not started: not a suspect
                            broken = True
                            break
                        running[fut], started[fut] = it, time.monotonic()
                    finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        it = running.pop(fut)
                        try:
                            result = fut.result()
                        except BrokenProcessPool:
                            suspects.append(it)
                            broken = True
                            continue
                        except Exception as e:  # e.g. a result that cannot be unpickled
                            result = ("fail", it, f"{it.path}: unhandled exception {type(e).__name__}: {e}")
                        try:
                            record(*result)
                        except DiskFullError:   # stop now; what is in flight gets no meta row,
                            _kill_workers(ex)   # so the rerun does it again
                            raise
                    # a queued task may wait for one other: twice the limit means a hang
                    if not broken and any(time.monotonic() - started[f] > 2 * self.file_timeout
                                          for f in running):
                        _kill_workers(ex)
                        broken = True
                    if broken:
                        suspects += list(running.values())
                        running.clear()
                        break
            for it in suspects:
                self._isolate(it, record)

    def _isolate(self, item: Item, record) -> None:
        from concurrent.futures import TimeoutError as FutureTimeout
        if not getattr(self, "_pool_checked", False):
            self._check_pool_starts()
        with self._pool(1) as ex:
            try:
                record(*ex.submit(_work, item).result(timeout=self.file_timeout))
            except BrokenProcessPool:
                record("fail", item, f"{item.path}: the decoder crashed the worker process "
                                     "(killed or segfault); the file is likely corrupt")
            except FutureTimeout:
                _kill_workers(ex)
                record("fail", item, f"{item.path}: processing took over {self.file_timeout:g} s "
                                     "(file_timeout) and was stopped; the file is likely corrupt")


def _noop() -> int:
    return os.getpid()


def _kill_workers(ex: ProcessPoolExecutor) -> None:
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, AttributeError):
            pass


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


# settings added after PNG folders and checkpoints were already written, with the value that
# gives the pixels those older runs made: a setting absent from a stored config means this
LATER_SETTINGS = {"inverted": "warn"}


def with_later_settings(pre: dict) -> dict:
    """A stored preprocessing config (preprocess.json, a checkpoint's) completed with the
    settings it predates, so that comparing it with today's config compares pixels."""
    return {**LATER_SETTINGS, **pre} if pre else pre


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


def _start_method() -> str:
    """Never plain fork: a parent with threads (OpenCV's pool, tqdm's monitor, CUDA) can hand
    a child a held lock, and the child hangs. forkserver forks workers from a clean,
    single-threaded server (fast after its first start); spawn elsewhere."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"
