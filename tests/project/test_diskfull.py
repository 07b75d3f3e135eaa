"""A full disk stops a run with one clear line, blames no file, leaves no half-written file, and
the same command run again continues; a preprocessing run that will not fit is warned about
early. (Kaggle keeps at most 20 GB under /kaggle/working; the RSNA set at 1536x768 is more.)"""
import errno
import os
import threading
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
from conftest import DiskFullOn

from rsna_utils.core import errors
from rsna_utils.core.errors import DiskFullError
from rsna_utils.image import folder_run
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.learn.checkpoint import save_checkpoint

Usage = namedtuple("Usage", "total used free")


class FullAfter:
    """Stands in for os.replace: the disk fills after `n` PNGs (other files are not counted);
    `tried` counts the PNGs the run tried to write."""

    def __init__(self, n: int):
        self.n, self.tried, self.real, self.lock = n, 0, os.replace, threading.Lock()

    def __call__(self, src, dst):
        if str(dst).endswith(".png"):
            with self.lock:                    # the GPU pipeline writes from several threads
                self.tried += 1
                if self.n <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device", str(dst))
                self.n -= 1
        return self.real(src, dst)


class FlushFails:
    """A log file whose disk fills after `rows` flushes (its close flushes too, as a real one)."""

    def __init__(self, fh, rows: int):
        self.fh, self.rows = fh, rows

    def write(self, text):
        return self.fh.write(text)

    def flush(self):
        self.rows -= 1
        if self.rows < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.fh.flush()

    def close(self):
        try:
            self.flush()
        finally:
            self.fh.close()


def failures(out: Path) -> pd.DataFrame:
    f = out / "failures.csv"
    return pd.read_csv(f) if f.exists() and f.stat().st_size else pd.DataFrame()


def test_a_full_disk_stops_preprocessing_and_the_same_command_continues(tmp_path, synth_small,
                                                                         monkeypatch, capsys):
    from rsna_utils.app.cli import main
    images, csv, out = synth_small / "train_images", synth_small / "train.csv", tmp_path / "o"
    n = len(pd.read_csv(csv))
    argv = ["preprocess", "--images", str(images), "--csv", str(csv), "--out", str(out),
            "--size", "48", "--workers", "0", "--quiet"]
    monkeypatch.setattr(os, "replace", FullAfter(3))
    assert main(argv) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "rsna preprocess: error:" in err and ".png: writing the PNG failed, its disk is full" in err
    assert "No space left on device" in err and "run the same command again" in err
    assert len(list(out.glob("*.png"))) == 3
    assert not list(out.glob("*.tmp*")), "a half-written PNG was left"
    assert failures(out).empty, "the full disk was blamed on a file"
    s = Preprocessor(PreprocessConfig(size=48), workers=0, progress=False).run(images, csv, out)
    assert (s.skipped, s.processed, s.failed) == (3, n - 3, 0)
    assert len(list(out.glob("*.png"))) == n


def test_a_full_disk_in_a_worker_stops_the_pool(tmp_path, synth_small):
    images, csv, out = synth_small / "train_images", synth_small / "train.csv", tmp_path / "o"
    rows = pd.read_csv(csv)
    n, at = len(rows), 6
    victim = images / str(rows.patient_id[at]) / f"{rows.image_id[at]}.dcm"
    with pytest.raises(DiskFullError, match=victim.name):
        Preprocessor(PreprocessConfig(size=48), workers=2, progress=False,
                     test_hook=DiskFullOn(victim.name)).run(images, csv, out)
    assert not (out / f"{victim.parent.name}_{victim.stem}.png").exists()
    assert failures(out).empty
    # it stopped there: at most the window of tasks in flight (2 x workers) went on
    assert len(pd.read_csv(out / "meta.csv")) <= at + 4 < n
    s = Preprocessor(PreprocessConfig(size=48), workers=2, progress=False).run(images, csv, out)
    assert s.processed + s.skipped == n and s.failed == 0


def test_a_full_disk_stops_the_gpu_pipeline(tmp_path, synth_small, monkeypatch):
    from fakes import FakeGpuDecoder

    from rsna_utils.image import gpu
    images, csv, out = synth_small / "train_images", synth_small / "train.csv", tmp_path / "g"
    n = len(pd.read_csv(csv))

    def run():
        return gpu.GpuPreprocessor(PreprocessConfig(size=48), backend="fake", device="cpu",
                                   batch_size=4, png_threads=2, progress=False,
                                   decoder=FakeGpuDecoder("exact")).run(images, csv, out)
    full = FullAfter(5)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError, match="disk is full"):
        run()
    monkeypatch.undo()
    # the queued writes were skipped: the failing one and at most one per other PNG thread
    assert full.tried <= 5 + 2 < n
    assert len(list(out.glob("*.png"))) == 5 and not list(out.glob("*.tmp*"))
    assert failures(out).empty
    s = run()
    assert (s.skipped, s.processed, s.failed) == (5, n - 5, 0)


def test_a_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    import torch

    def torch_save_on_a_full_disk(obj, f):   # what torch 2.x raises when the disk fills
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 105899520 "
                           "vs 105899408")
    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    last = tmp_path / "last.pt"
    last.write_bytes(b"the previous epoch")

    def usage(p):       # the partial file holds the last 400 MB; deleting it frees them again
        return Usage(10**12, 10**12, 3_000 if list(tmp_path.glob(".last.pt.tmp*")) else 4 * 10**8)
    monkeypatch.setattr(errors.shutil, "disk_usage", usage)
    with pytest.raises(DiskFullError, match=r"last\.pt: saving the checkpoint failed, its disk is "
                                            r"full \(3 kB free.*larger disk; --resume"):
        save_checkpoint({"x": 1}, last)
    assert last.read_bytes() == b"the previous epoch"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temporary file left
    # the same failure with plenty of space is not called a full disk
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint({"x": 1}, last)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("free, warned", [(10_000, True), (10**12, False)])
def test_a_run_that_will_not_fit_is_warned_about_early(tmp_path, synth_small, monkeypatch, capsys,
                                                       free, warned):
    images, csv, out = synth_small / "train_images", synth_small / "train.csv", tmp_path / "o"
    monkeypatch.setattr(folder_run, "SPACE_CHECK_AFTER", 4)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: Usage(10**12, 0, free))
    s = Preprocessor(PreprocessConfig(size=48), workers=0, progress=False).run(images, csv, out)
    err = capsys.readouterr().err
    assert s.failed == 0
    if warned:
        assert f"PNGs are still to be written to {out} and its disk has 10 kB free" in err
        assert "first 4 images" in err and "--out a folder on a larger disk" in err
    else:
        assert "warning" not in err


def test_only_a_full_disk_is_called_full(tmp_path, monkeypatch):
    f = tmp_path / "x.png"
    tiny = Usage(10**12, 10**12, 1_000)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: tiny)
    # an errno that is not about space is never a full disk, however little is free
    assert errors.disk_full(f, "writing", PermissionError(errno.EACCES, "denied"), "fix") is None
    full = errors.disk_full(f, "writing", OSError(errno.ENOSPC, "No space left"), "fix it")
    assert isinstance(full, DiskFullError) and str(full).startswith(f"{f}: writing failed, its disk is full (1 kB free")
    assert str(full).endswith("fix it")
    quota = errors.disk_full(f, "writing", OSError(errno.EDQUOT, "Disk quota exceeded"), "fix")
    assert "disk quota is used up" in str(quota)
    # no errno (torch.save): decided by the free space
    assert errors.disk_full(f, "saving", RuntimeError("unexpected pos"), "fix") is not None
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**12))
    assert errors.disk_full(f, "saving", RuntimeError("unexpected pos"), "fix") is None
    assert errors.disk_full(f, "writing", OSError(errno.ENOSPC, "No space left"), "fix") is not None


def test_a_full_disk_while_logging_a_row(tmp_path, synth_small, monkeypatch):
    images, csv, out = synth_small / "train_images", synth_small / "train.csv", tmp_path / "o"
    n = len(pd.read_csv(csv))
    real_init = folder_run._CsvLog.__init__

    def init(self, path, columns, fresh=False):
        real_init(self, path, columns, fresh)
        if path.name == "meta.csv":
            self.fh = FlushFails(self.fh, rows=4)      # the header and three rows fit
            self.w = folder_run.csv.DictWriter(self.fh, fieldnames=self.columns, extrasaction="ignore")
    monkeypatch.setattr(folder_run._CsvLog, "__init__", init)
    with pytest.raises(DiskFullError, match=r"meta\.csv: adding a row failed, its disk is full"):
        Preprocessor(PreprocessConfig(size=48), workers=0, progress=False).run(images, csv, out)
    monkeypatch.undo()
    assert failures(out).empty
    s = Preprocessor(PreprocessConfig(size=48), workers=0, progress=False).run(images, csv, out)
    assert s.failed == 0 and s.skipped + s.processed == n and s.skipped >= 3
    assert len(pd.read_csv(out / "meta.csv")) == n


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """val_predictions.csv, metrics, splits.csv and the OOF tables go through write_atomic: a
    write that fails half-way leaves the previous file whole and no temporary behind."""
    path = tmp_path / "val_predictions.csv"
    errors.write_atomic(path, "image_id,prediction\n1,0.5\n")
    assert path.read_text() == "image_id,prediction\n1,0.5\n"

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(errors.os, "replace", no_space)
    with pytest.raises(DiskFullError, match=r"val_predictions\.csv: writing val_predictions\.csv "
                       r"failed, its disk is full .*Free some space"):
        errors.write_atomic(path, "image_id,prediction\n1,0.9\n2,0.1\n")
    assert path.read_text() == "image_id,prediction\n1,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_predictions.csv"]

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(errors.os, "replace", denied)
    with pytest.raises(PermissionError):                 # not a full disk: passed on unchanged
        errors.write_atomic(path, "x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_predictions.csv"]
