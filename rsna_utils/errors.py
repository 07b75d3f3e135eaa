"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""
import errno
import shutil
from pathlib import Path


class RsnaError(Exception):
    """Base class: the message names the file or value, what is wrong, and the fix."""


class DecodeError(RsnaError):
    """No backend could decode a DICOM file's pixel data."""


class DiskFullError(RsnaError):
    """The disk of the output is full. The run stops at once (every later file would fail the
    same way and be wrongly blamed); what was written is kept and a rerun continues."""


# a write that failed with one of these errnos, or failed with this little space left, is a
# full disk (torch.save reports ENOSPC as a RuntimeError "unexpected pos ...")
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NEARLY_FULL = 256 * 2**20


def free_bytes(path) -> int | None:
    """Free space on the disk that holds `path` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def disk_full(path, doing: str, err: BaseException, fix: str) -> DiskFullError | None:
    """The error to raise instead of `err` when writing `path` failed because its disk is full,
    or None when the failure was something else."""
    free = free_bytes(path)
    full = isinstance(err, OSError) and err.errno in _FULL_ERRNOS
    if not full and (free is None or free >= NEARLY_FULL):
        return None
    left = f"{human_bytes(free)} free" if free is not None else "no space left"
    return DiskFullError(f"{path}: {doing} failed, its disk is full ({left}; {type(err).__name__}: "
                         f"{err}). {fix}")
