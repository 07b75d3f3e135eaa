"""SIGKILL in the middle of `rsna preprocess` and `rsna train`, then rerun: the outputs equal
those of an uninterrupted run and no partial file is left."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch


def _kill_when(cmd, ready, timeout=240):
    """Start cmd in its own process group; SIGKILL the group once ready() is true."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            pytest.fail("the run finished before it could be killed; make it longer")
        if ready():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("the run never reached the kill point")


def _rows(path):
    try:
        return sum(1 for _ in open(path)) - 1
    except FileNotFoundError:
        return 0


def test_preprocess_killed_and_rerun_equals_uninterrupted(tmp_path, synth_small):
    base = [sys.executable, "-m", "rsna_utils", "preprocess", "--images",
            str(synth_small / "train_images"), "--csv", str(synth_small / "train.csv"),
            "--size", "64", "--workers", "1", "--quiet"]
    subprocess.run(base + ["--out", str(tmp_path / "clean")], check=True, timeout=300)
    killed = tmp_path / "killed"
    _kill_when(base + ["--out", str(killed)], lambda: _rows(killed / "meta.csv") >= 10)
    n_before = _rows(killed / "meta.csv")
    assert 10 <= n_before < len(pd.read_csv(synth_small / "train.csv"))
    r = subprocess.run(base + ["--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "skipped" in r.stdout
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").glob("*.png")}
    again = {p.name: p.read_bytes() for p in killed.glob("*.png")}
    assert again == clean
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]
    assert sorted(pd.read_csv(killed / "meta.csv").png) == sorted(clean)


@pytest.fixture(scope="module")
def png64(tmp_path_factory, synth_small):
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    out = tmp_path_factory.mktemp("png64")
    Preprocessor(PreprocessConfig(size=64), workers=2, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", out)
    return out


def test_train_killed_and_resumed_equals_uninterrupted(tmp_path, synth_small, png64):
    def cmd(out, resume=False):
        c = [sys.executable, "-m", "rsna_utils", "train", "--data", str(png64), "--csv",
             str(synth_small / "train.csv"), "--out", str(out), "--model", "resnet18", "--size", "64",
             "--epochs", "4", "--batch-size", "8", "--workers", "0", "--device", "cpu",
             "--max-steps", "4", "--quiet"]
        return c + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "clean"), check=True, timeout=600, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"

    def after_first_epoch():
        return _rows(killed / "metrics.csv") >= 1
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _kill_when(cmd(killed), after_first_epoch)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
    done = pd.read_csv(killed / "metrics.csv")
    assert 1 <= len(done) < 4
    ck = torch.load(killed / "last.pt", weights_only=True)   # the last complete checkpoint loads
    assert ck["epoch"] == len(done) - 1
    subprocess.run(cmd(killed, resume=True), check=True, timeout=600, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a = torch.load(tmp_path / "clean" / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert list(pd.read_csv(killed / "metrics.csv").epoch) == [0, 1, 2, 3]
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]
