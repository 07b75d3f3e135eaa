"""Library warnings in the project's words: one line naming the library and what it said, no
site-packages path, no source line (`warn_and_log(msg, UserWarning)`), each message once.
The CLI installs it in its process (`plain_warnings`); worker processes (forkserver or spawn:
they do not inherit it) install it in their initializer (`worker_warnings`), where --quiet
drops the libraries' warnings: a file's outcome is in failures.csv / the warnings file."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path


def _library(filename) -> str:
    parts = Path(str(filename)).parts
    return parts[parts.index("site-packages") + 1] if "site-packages" in parts else ""


def plain_warnings(command: str, quiet: bool = False) -> None:
    """`warnings.showwarning` for this process: "rsna COMMAND: warning from LIB: TEXT" (the first
    line of the message), each once; with `quiet`, a library's warnings are not shown."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        lib = _library(filename)
        if quiet and lib:
            return
        key = f"{lib}:{text}"
        if key not in seen:
            seen.add(key)
            print(f"rsna {command}: warning{f' from {lib}' if lib else ''}: {text}",
                  file=sys.stderr)
    warnings.showwarning = show


def worker_warnings(command: str, quiet: bool = False, *_worker_id) -> None:
    """`plain_warnings` in a worker process (a pool's initializer or a DataLoader's
    worker_init_fn, which passes the worker's id)."""
    plain_warnings(command, quiet)
