"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""
import errno
import os
import shutil
from contextlib import contextmanager
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
    return (f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6
            else f"{n / 1e3:.0f} kB")


def disk_full(path, doing: str, err: BaseException, fix: str) -> DiskFullError | None:
    """The error to raise instead of `err` when writing `path` failed because its disk is full,
    or None when the failure was something else. An OSError's errno decides; an error without
    one (torch.save's RuntimeError) counts as a full disk when less than NEARLY_FULL is free.
    Call it before deleting what the failed write left, which holds the space it took."""
    free = free_bytes(path)
    no = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if no is not None and no not in _FULL_ERRNOS:
        return None
    if no is None and (free is None or free >= NEARLY_FULL):
        return None
    what = ("its disk quota is used up" if no == getattr(errno, "EDQUOT", None)
            else "its disk is full")
    left = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return DiskFullError(f"{path}: {doing} failed, {what} ({left}; {type(err).__name__}: {err}). "
                         f"{fix}")


SPACE_FIX = "Free some space, or write to a folder on a disk with room, and run it again."


def write_atomic(path, content, fix: str = SPACE_FIX, doing: str | None = None) -> None:
    """Write `content` to `path` through a temporary file beside it (`.NAME.tmpPID`), so that a
    reader (or a crash half-way) sees the old file or the new one, never half of one. `content`:
    text, bytes, or a function that writes the temporary path it is given (torch.save, a figure,
    a DICOM). A full disk is raised as one DiskFullError line naming `path`, what was being
    done and `fix`; no temporary is left behind. The one atomic write of the package."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")    # per process: DDP ranks, workers
    with writing(path, doing or f"writing {path.name}", fix, tmp):
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, (bytes, bytearray, memoryview)):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)


@contextmanager
def atomic_folder(path):
    """Build a folder under a temporary sibling name (yielded); on success it replaces `path`
    whole, so a half-built folder (an export, a bundle) never sits under the real name."""
    import shutil
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextmanager
def writing(path, doing: str, fix: str, tmp=None):
    """Around a write of `path` (through the temporary file `tmp` when given): a failure leaves
    no `tmp` behind, and one caused by a full disk is raised as DiskFullError naming `path`,
    the free space and `fix`; any other error passes through unchanged."""
    try:
        yield
    except BaseException as e:
        # any library's error, not only OSError: torch.save raises RuntimeError and safetensors
        # its own SafetensorError on a full disk (disk_full then goes by the space left)
        ours = isinstance(e, RsnaError) or not isinstance(e, Exception)
        full = None if ours else disk_full(path, doing, e, fix)
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if full is None:
            raise
        raise full from e


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Print `message` to stderr the first time only (a decision a run makes once: the decoder
    it picked, the precision it computes in)."""
    import sys
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)
