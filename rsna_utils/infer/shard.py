"""The test patients split over several devices (issue 41): a Kaggle T4 x2 scores half the
patients on each GPU.

`predict` with `shards` N > 1 writes each shard's rows of test.csv (whole patients, in the
table's order, the shards balanced by images) and runs one process per shard,
`python -m rsna_utils.infer.shard_job JOB.json`, each on its own device (CUDA_VISIBLE_DEVICES set
to one GPU; on the CPU, N processes sharing the cores). Each process scores its images as the
one-process run does (`predict.score_images`) and writes its per-image table; the parent puts
the rows back in test.csv's order and makes the submission from the whole table (the
aggregation, the threshold or quantile cut and the calibration see every breast at once), so
the submission is the one-process one. A shard that fails stops the run with one line naming
the shard and its log; the other shards are stopped and nothing is written.

Tested on the CPU: two shards give the one-process submission byte for byte with image-level
members. A breast-level member pools its breasts in calls of up to 512 (`breast.BreastStream`),
and a shard's calls hold other breasts than the one process's: the same values within float32
rounding (about 1e-6; tests/learn/test_breast.py). On a GPU the kernels may also round a shard's
smaller last batch differently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError

SHARDS_AUTO = "auto"


def parse_shards(value) -> int | str:
    """"auto", or a whole number >= 1 (given as text on the command line or in a plan)."""
    if isinstance(value, str) and value.strip().lower() == SHARDS_AUTO:
        return SHARDS_AUTO
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise RsnaError(f"shards={value!r}: give auto (one process per CUDA GPU found) or a "
                        "whole number >= 1")
    return n


def resolve_shards(shards, device: str) -> tuple[int, str]:
    """(processes, the device each uses: "cuda" or "cpu") for `shards` ("auto" or N) and the
    config's `device`. auto: one per CUDA GPU found (1 without, or with device cpu); N with
    device cuda needs N GPUs; N otherwise runs on the GPUs when there are N, else the CPU."""
    import torch
    shards = parse_shards(shards)
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if device == "cuda" and gpus == 0:
        return (1 if shards == SHARDS_AUTO else shards), "cuda"   # resolve_device names it
    if shards == SHARDS_AUTO:
        return max(gpus, 1), ("cuda" if gpus else "cpu")
    if device == "cuda" and shards > gpus:
        raise RsnaError(f"shards={shards} on device cuda: {gpus} CUDA GPU(s) here; give "
                        f"--shards auto or at most {gpus}, or --device cpu")
    return shards, ("cuda" if gpus >= shards and device != "cpu" else "cpu")


def split_patients(df: pd.DataFrame, n: int) -> list[np.ndarray]:
    """Row positions of each shard: the patients in order of their first row, cut into at most
    `n` runs of about equal images; a patient's rows always in one shard, each shard's rows in
    the table's order."""
    pos = pd.Series(np.arange(len(df)), index=df["patient_id"].to_numpy())
    patients = list(dict.fromkeys(df["patient_id"]))
    sizes = pos.groupby(level=0).size().loc[patients].to_numpy()
    n = max(1, min(n, len(patients)))
    middle = np.cumsum(sizes) - sizes / 2             # where each patient's images sit
    shard_of = np.minimum((middle * n / max(len(df), 1)).astype(int), n - 1)
    which = dict(zip(patients, shard_of))
    of_row = np.array([which[p] for p in df["patient_id"]])
    return [np.flatnonzero(of_row == k) for k in range(n) if (of_row == k).any()]


def score_sharded(cfg, df: pd.DataFrame, n: int, device: str) -> pd.DataFrame:
    """`predict.score_images` of the whole table, by `n` processes on their own devices: one
    row per image of `df`, in its order. RsnaError naming the shard and its log when one
    fails (the others stopped)."""
    parts = split_patients(df, n)
    keep_dir = cfg.out is not None
    work = (Path(cfg.out).with_name(Path(cfg.out).stem + "_shards") if keep_dir
            else Path(tempfile.mkdtemp(prefix="rsna_shards_")))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    gpus = _visible_gpus() if device == "cuda" else []
    threads = max(1, (os.cpu_count() or 1) // len(parts))
    procs = []
    try:
        for k, rows in enumerate(parts):
            csv, job, log = (work / f"shard{k}.{ext}" for ext in ("csv", "json", "log"))
            df.iloc[rows].to_csv(csv, index=False)
            settings = dict(dataclasses.asdict(cfg), csv=str(csv), out=None, shards=1,
                            sample_submission=None, labels=None, progress=False,
                            max_unreadable=1.0, device=device,
                            workers=-(-cfg.workers // len(parts)))
            job.write_text(json.dumps({"config": settings,
                                       "result": str(work / f"shard{k}.pkl")}))
            env = dict(os.environ)
            if device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = gpus[k]
            else:
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            with open(log, "w") as fh:
                p = subprocess.Popen([sys.executable, "-m", "rsna_utils.infer.shard_job",
                                      str(job)], stdout=fh, stderr=subprocess.STDOUT, env=env)
            procs.append((k, rows, p, log, time.perf_counter()))
        _wait(procs, len(parts), device, cfg.progress)
    finally:            # an error or Ctrl-C here leaves no shard running
        _stop([p for _, _, p, _, _ in procs])
    merged = []
    for k, rows, _, _, _ in procs:
        part = pd.read_pickle(work / f"shard{k}.pkl")
        if len(part) != len(rows):
            raise RsnaError(f"shard {k} of {len(parts)}: {len(part)} rows scored for {len(rows)} "
                            f"images; its log: {work / f'shard{k}.log'}")
        merged.append(part.set_axis(rows))
    imgs = pd.concat(merged).sort_index()
    imgs.index = df.index
    shutil.rmtree(work, ignore_errors=True)
    return imgs


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [g.strip() for g in given.split(",") if g.strip()] if given else []
    return names or [str(i) for i in range(torch.cuda.device_count())]


def _wait(procs: list, n: int, device: str, progress: bool) -> None:
    """Until every shard is done; the first to fail stops the others and is the error."""
    running = list(procs)
    while running:
        for item in list(running):
            k, rows, p, log, t0 = item
            rc = p.poll()
            if rc is None:
                continue
            running.remove(item)
            if rc != 0:
                raise RsnaError(f"shard {k} of {n} ({len(rows)} images, {device}) failed with "
                                f"exit code {rc}: {_last_line(log)}; its log: {log}; no "
                                "submission written")
            if progress:
                print(f"shard {k} of {n}: {len(rows)} images scored in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        time.sleep(0.2)


def _stop(procs: list) -> None:
    """Terminate the shard processes still running and wait for them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "nothing in its log"
