"""Issue 41: the test patients split over several devices (`predict --shards N`), one process
each, tested on the CPU with two processes: the merged submission is the one-process one, and
a failing shard is one line naming it and its log, with nothing written."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.predict import PredictConfig, predict
from rsna_utils.infer.shard import resolve_shards, split_patients


def test_shards_keep_each_patient_whole_and_the_tables_order():
    pid = [5, 5, 7, 9, 9, 9, 5, 11, 7, 13, 13, 2]        # patients interleaved
    df = pd.DataFrame({"patient_id": pid})
    parts = split_patients(df, 2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(df)))
    owner = {}
    for k, rows in enumerate(parts):
        assert list(rows) == sorted(rows)                 # the table's order within a shard
        for p in df.patient_id.iloc[rows]:
            assert owner.setdefault(p, k) == k            # a patient never split
    assert [len(r) for r in parts] == [5, 7]      # the nearest to 6 / 6 in whole patients
    assert len(split_patients(df.iloc[:2], 4)) == 1        # more shards than patients: fewer
    assert resolve_shards("auto", "cpu") == (1, "cpu")
    assert resolve_shards(2, "cpu") == (2, "cpu")
    assert PredictConfig("i", "c", ["x"], shards="2").shards == 2
    with pytest.raises(RsnaError, match=r"shards='two': give auto .* or a whole number >= 1"):
        PredictConfig("i", "c", ["x"], shards="two")


def test_two_cpu_shards_give_the_one_process_submission_exactly(tmp_path, synth_small, tiny_ckpt):
    common = dict(checkpoints=[str(tiny_ckpt)], workers=0, batch_size=4, device="cpu",
                  progress=False, tta=True, binarize_how="quantile:0.3",
                  sample_submission=str(synth_small / "sample_submission.csv"))
    args = (synth_small / "test_images", synth_small / "test.csv")
    one = predict(*args, out=str(tmp_path / "one" / "submission.csv"), **common)
    two = predict(*args, out=str(tmp_path / "two" / "submission.csv"), shards=2, **common)
    assert (tmp_path / "one" / "submission.csv").read_bytes() == \
        (tmp_path / "two" / "submission.csv").read_bytes()
    pd.testing.assert_frame_equal(one.images, two.images)
    assert one.cut["flagged"] == two.cut["flagged"]         # the quantile over every breast
    for name in ("submission_images.csv", "submission_warnings.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not (tmp_path / "two" / "submission_shards").exists()     # the work folder removed


def test_a_failing_shard_is_one_line_naming_it_and_its_log_and_nothing_is_written(
        tmp_path, synth_small, tiny_ckpt):
    images = tmp_path / "images"
    shutil.copytree(synth_small / "test_images", images)
    test = pd.read_csv(synth_small / "test.csv")
    last = split_patients(test, 2)[1]
    for p in test.patient_id.iloc[last].unique():          # every file of shard 1 gone
        shutil.rmtree(images / str(p))
    out = tmp_path / "sub" / "submission.csv"
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "predict", "--images", str(images),
                        "--csv", str(synth_small / "test.csv"), "--checkpoints", str(tiny_ckpt),
                        "--out", str(out), "--workers", "0", "--device", "cpu", "--shards", "2",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    log = out.parent / "submission_shards" / "shard1.log"
    assert "shard 1 of 2" in lines[0] and f"its log: {log}" in lines[0]
    assert "no submission written" in lines[0] and log.exists()
    assert not out.exists() and not list(out.parent.glob("submission_*.csv"))
