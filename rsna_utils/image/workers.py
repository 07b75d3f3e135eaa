"""The worker processes of `Preprocessor`: their state (module globals, set once per process by
the pool initializer), the task each runs on one image (`_work`, which never raises), and the
pool's helpers (start method, killing a stuck pool).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import cv2

from rsna_utils.core.errors import DiskFullError, RsnaError
from rsna_utils.image.convert import PreprocessConfig, preprocess_image, write_png
from rsna_utils.image.folder_run import Item

# Worker state: each process keeps its config; set once by the pool initializer.
_CFG: PreprocessConfig | None = None
_BACKEND = "auto"
_COMPRESSION = 1
_HOOK = None
_DECODERS = None        # the run's DecoderSet, found once in the parent and sent by value


def _init_worker(cfg: PreprocessConfig, backend: str, compression: int, hook,
                 quiet: bool = False, decoders=None) -> None:
    global _CFG, _BACKEND, _COMPRESSION, _HOOK, _DECODERS
    _CFG, _BACKEND, _COMPRESSION, _HOOK, _DECODERS = cfg, backend, compression, hook, decoders
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
        img, meta = preprocess_image(item.path, _CFG, _BACKEND, decoders=_DECODERS)
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


def _noop() -> int:
    return os.getpid()


def _kill_workers(ex: ProcessPoolExecutor) -> None:
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, AttributeError):
            pass


def _start_method() -> str:
    """Never plain fork: a parent with threads (OpenCV's pool, tqdm's monitor, CUDA) can hand
    a child a held lock, and the child hangs. forkserver forks workers from a clean,
    single-threaded server (fast after its first start); spawn elsewhere."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"
