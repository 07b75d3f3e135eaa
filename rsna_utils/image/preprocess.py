"""DICOM -> windowed, cropped, resized PNG: one image (`preprocess_image`) and a whole folder
(`Preprocessor.run`: parallel, resumable, shardable, crash-contained).

The jobs live in their own modules; this one holds the CPU folder runner and keeps the old
names importable from here:
- `rsna_utils.image.convert`: the settings (`PreprocessConfig`), the per-image kernel
  (`preprocess_image`, its order of work explained there) and the PNG writer (`write_png`);
- `rsna_utils.image.folder_run`: the bookkeeping every folder run shares, CPU or GPU (items,
  shards, resume, meta.csv / failures.csv, `RunSummary`, `FolderRun`);
- `rsna_utils.image.workers`: the worker processes' state and task.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from rsna_utils.core.errors import DiskFullError, RsnaError
from rsna_utils.dicom.decoders.registry import DecoderSet
from rsna_utils.image.convert import (  # noqa: F401 - re-exported: their old home
    LATER_SETTINGS, PNG_SPACE_FIX, PreprocessConfig, PreprocessError, preprocess_image,
    with_later_settings, write_png)
from rsna_utils.image.folder_run import (  # noqa: F401 - re-exported: their old home
    FAILURE_COLUMNS, META_CSV_COLUMNS, FolderRun, Item, RunSummary, list_items, load_done,
    open_run, parse_shard, space_warning)
from rsna_utils.image.workers import _init_worker, _kill_workers, _noop, _start_method, _work


class Preprocessor:
    """DICOM folder -> PNG folder with meta.csv and failures.csv.

    >>> Preprocessor(PreprocessConfig(size=512), workers=2).run("train_images", "train.csv", "png")

    `decoders`: a `DecoderSet`; by default each run finds one (`DecoderSet.find(backend)`: an
    uninstalled backend fails there, before any file) and hands it to its workers.
    """

    def __init__(self, cfg: PreprocessConfig | None = None, backend: str = "auto",
                 workers: int | None = None, png_compression: int = 1, progress: bool = True,
                 test_hook=None, file_timeout: float = 120.0, decoders: DecoderSet | None = None):
        self.cfg = cfg or PreprocessConfig()
        self.backend = backend
        self.decoders = decoders
        self._run_decoders = decoders
        # workers=0 runs in this process (no crash containment); 1 or more use worker processes
        self.workers = (os.cpu_count() or 1) if workers is None else max(0, workers)
        self.png_compression = png_compression
        self.progress = progress
        self.test_hook = test_hook  # called with each path in the worker (crash tests)
        self.file_timeout = file_timeout  # seconds one file may take before its worker is killed

    def process(self, path: str | Path) -> tuple[np.ndarray, dict]:
        return preprocess_image(path, self.cfg, self.backend, decoders=self.decoders)

    def _pool(self, n: int) -> ProcessPoolExecutor:
        ctx = mp.get_context(_start_method())
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["rsna_utils.image.preprocess"])
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.cfg, self.backend, self.png_compression,
                                             self.test_hook, not self.progress,
                                             self._run_decoders))

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
        self._run_decoders = self.decoders or DecoderSet.find(self.backend)
        with FolderRun(out, self.cfg, images, csv_path, shard, "preprocess",
                       self.progress) as run:
            def record(status: str, item: Item, info) -> None:
                if status == "stop":
                    raise DiskFullError(info)
                (run.ok if status == "ok" else run.fail)(item, info)
                run.advance()

            if self.workers == 0:   # in this process: for debugging; a decoder crash ends the run
                _init_worker(self.cfg, self.backend, self.png_compression, None,
                             decoders=self._run_decoders)
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
