"""Issue 40, items 2 and 4: nothing a user made is replaced unasked (a run folder, a data
folder, a bundle), the interrupt says how to go on, and the small frictions: --ensemble lists
its checkpoints, no library warning with its path through --quiet, a CSV of another folder is
one line and leaves nothing behind, the skipped real-file tests are said."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO


from rsna_utils.app.cli import build_parser, main
from rsna_utils.core.errors import RsnaError



def _pngs(root: Path) -> tuple[Path, Path]:
    """A CSV of 4 images and a PNG folder with a file for each: enough for `rsna train` to get
    past its input checks (nothing here is trained on)."""
    png, rows = root / "png", []
    png.mkdir(parents=True)
    for pid in (1, 2):
        for iid, lat in ((10 * pid, "L"), (10 * pid + 1, "R")):
            rows.append(dict(patient_id=pid, image_id=iid, laterality=lat, view="CC",
                             cancer=int(iid == 20)))
            (png / f"{pid}_{iid}.png").write_bytes(b"")
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return png, root / "train.csv"


def _one_run(run: Path) -> dict:
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"the 6-epoch model")
    (run / "last.pt").write_bytes(b"its last epoch")
    pd.DataFrame({"epoch": range(6)}).to_csv(run / "metrics.csv", index=False)
    return {p.name: p.read_bytes() for p in run.iterdir()}


def test_train_into_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    """Before: `rsna train --out r` replaced r's best.pt (a 6-epoch run became a 1-epoch one),
    exit 0."""
    png, csv = _pngs(tmp_path)
    run = tmp_path / "r"
    before = _one_run(run)
    code = main(["train", "--data", str(png), "--csv", str(csv), "--out", str(run),
                 "--model", "resnet18", "--size", "48", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{run} already holds a run (best.pt, last.pt, metrics.csv)" in err, err
    assert "--resume continues it" in err and "--overwrite replaces it" in err
    assert "another --out" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before     # nothing written


def test_overwrite_is_a_training_setting_and_replaces_the_whole_run(tmp_path):
    from rsna_utils.learn.train import resume
    from rsna_utils.learn.train_config import TrainConfig
    png, csv = _pngs(tmp_path)
    run = tmp_path / "r"
    _one_run(run)
    (run / "notes.txt").write_text("mine")
    a = build_parser().parse_args(["train", "--overwrite"])
    assert a.overwrite is True
    cfg = TrainConfig(data=str(png), csv=str(csv), out=str(run), overwrite=True)
    # the old run's files go before the first epoch: a stale best.pt never sits beside new
    # metrics (with select_window > 1 the first epochs write none); the user's own file stays
    assert resume(cfg, run, None, None) == (0, None, [])
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    with pytest.raises(RsnaError, match="resume and overwrite both given.*give one"):
        TrainConfig(out=str(run), resume=True, overwrite=True)


def test_ctrl_c_in_train_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Before: 'rsna train: interrupted', without a word on --resume."""
    import rsna_utils.learn.train as tr

    def stopped(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, "train", stopped)
    png, csv = _pngs(tmp_path)
    run = tmp_path / "r"
    _one_run(run)
    args = ["train", "--data", str(png), "--csv", str(csv), "--out", str(run), "--epochs", "9"]
    assert main(args + ["--resume"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"rsna train: interrupted: 6 of 9 epochs kept in {run / 'last.pt'}; the same " \
           "command with --resume continues from there" in err, err
    assert main(args + ["--out", str(tmp_path / "new")]) == 130
    assert "no epoch finished" in capsys.readouterr().err


def test_a_plan_rerun_replaces_its_own_training_runs():
    """`make demo` twice: the plan's training steps train into runs/demo/* again; the plan run
    is the request (rsna train --overwrite), unless the step says otherwise."""
    from rsna_utils.app.notebooks import _give_overwrite
    from rsna_utils.learn.train_config import TrainConfig
    p = _give_overwrite({"out": "runs/demo/resnet18", "extra": {"ema": 0.9}})
    assert p["extra"] == {"ema": 0.9, "overwrite": True}
    assert TrainConfig.from_namespace({**p, "epochs": 1}).overwrite is True
    assert _give_overwrite({"extra": {"resume": True}})["extra"] == {"resume": True}


def test_synth_into_an_existing_dataset_is_refused_unless_overwrite(tmp_path, capsys):
    """Before: `rsna synth` and `make synth` wrote over the demo's data folder silently."""
    data = tmp_path / "data"
    args = ["synth", "--out", str(data), "--patients", "1", "--test-patients", "0",
            "--workers", "1", "--quiet"]
    assert main(args) == 0
    (data / "train_images" / "999").mkdir()
    (data / "train_images" / "999" / "1.dcm").write_bytes(b"an image of the old set")
    before = (data / "train.csv").read_bytes()
    capsys.readouterr()
    assert main(args + ["--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data} already holds a dataset (train.csv): --overwrite " \
        "replaces it" in err, err
    assert (data / "train.csv").read_bytes() == before
    assert main(args + ["--seed", "5", "--overwrite"]) == 0
    assert (data / "train.csv").read_bytes() != before
    assert not (data / "train_images" / "999").exists()       # none of the old set stays
    make = (REPO / "Makefile").read_text()
    assert "$(if $(OVERWRITE),--overwrite)" in make


def test_demo_on_an_existing_dataset_says_it_reuses_it(tmp_path, capsys, monkeypatch):
    """Before: `make demo` reused whatever train.csv was there without a word."""
    import rsna_utils.app.notebooks as nbs
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"patient_id": [1, 1, 2], "image_id": [1, 2, 3]}).to_csv(data / "train.csv",
                                                                          index=False)
    monkeypatch.setattr(nbs, "run_plan", lambda *a, **k: {"run_dir": "r", "notebooks": [],
                                                          "submission": None})
    assert main(["demo", "--data", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("using the dataset already in") == 1, out
    assert f"using the dataset already in {data} (3 images of 2 patients), not a new one" in out
    assert "--overwrite" in out


def test_bundle_refuses_a_folder_that_is_not_an_earlier_bundle(tmp_path, monkeypatch):
    """Before: `rsna bundle --out DIR` replaced any DIR whole (a user's folder with it)."""
    from rsna_utils.app import bundle
    monkeypatch.setattr(bundle, "plan_bundle", lambda req: {})
    monkeypatch.setattr(bundle, "_fill_bundle", lambda tmp, *a: (
        (tmp / "wheels").mkdir(), (tmp / bundle.MARKER).write_text("{}"), [])[-1])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    with pytest.raises(RsnaError, match=r"mine exists and is not an earlier bundle \(no "
                                        r"rsna_bundle.json\).*new or empty --out"):
        bundle.build_bundle(mine)
    assert (mine / "thesis.tex").read_text() == "months of work"
    if sys.version_info[:2] == (3, 11) and sys.platform == "linux":
        bundle.build_bundle(tmp_path / "b")            # new: written
        bundle.build_bundle(tmp_path / "b")            # an earlier bundle: replaced
        (tmp_path / "empty").mkdir()
        bundle.build_bundle(tmp_path / "empty")
        assert (tmp_path / "empty" / bundle.MARKER).exists()


def test_an_export_folder_of_the_users_is_refused():
    """What export_models does with an existing --export folder (checked for issue 40): an
    earlier export is replaced, any other folder refused."""
    from rsna_utils.infer.kaggle import _is_export
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "ensemble.json").write_text("{}")
        (d / "a.pt").write_bytes(b"")
        assert _is_export(d)
        (d / "notes.txt").write_text("mine")
        assert not _is_export(d)


def _ensemble_files(tmp_path: Path) -> tuple[Path, Path]:
    export = tmp_path / "rsna-models"
    export.mkdir()
    for n in ("resnet18_best.pt", "lite0_best.pt"):
        (export / n).write_bytes(b"")
    (export / "ensemble.json").write_text(json.dumps(
        {"checkpoints": ["resnet18_best.pt", "lite0_best.pt"], "threshold": 0.3, "agg": "mean"}))
    for r in ("runs/a", "runs/b"):
        (tmp_path / r).mkdir(parents=True)
        (tmp_path / r / "best.pt").write_bytes(b"")
    oof = tmp_path / "runs" / "ensemble.json"
    oof.write_text(json.dumps({"threshold": 0.3, "agg": "mean", "tta": False,
                               "runs": [{"run": "runs/a"}, {"run": "runs/b"}]}))
    return export / "ensemble.json", oof


def test_predict_ensemble_needs_no_checkpoints(tmp_path, monkeypatch, capsys):
    """Before: `rsna predict --ensemble ensemble.json` still demanded --checkpoints."""
    import rsna_utils.infer.predict as pr
    export, oof = _ensemble_files(tmp_path)
    seen = {}

    class Seen(Exception):
        pass

    def fake_predict(cfg):
        seen["checkpoints"] = cfg.checkpoints
        raise Seen
    monkeypatch.setattr(pr, "predict", fake_predict)
    monkeypatch.chdir(tmp_path)
    base = ["predict", "--images", "imgs", "--csv", "test.csv"]
    with pytest.raises(Seen):
        main(base + ["--ensemble", str(export)])
    assert seen["checkpoints"] == [str(export.parent / "resnet18_best.pt"),
                                   str(export.parent / "lite0_best.pt")]
    with pytest.raises(Seen):                   # `rsna oof`'s file: the best.pt of its runs
        main(base + ["--ensemble", str(oof)])
    assert seen["checkpoints"] == ["runs/a/best.pt", "runs/b/best.pt"]
    with pytest.raises(Seen):                   # given ones win, as before
        main(base + ["--ensemble", str(oof), "--checkpoints", "x.pt"])
    assert seen["checkpoints"] == ["x.pt"]
    assert main(base) == 2                      # neither: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no --checkpoints given" in err and "--ensemble" in err


def _csv_of_other_ids(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "test_images"
    (images / "7").mkdir(parents=True)
    (images / "7" / "70.dcm").write_bytes(b"")      # an image, but not one the CSV lists
    pd.DataFrame({"patient_id": range(243), "image_id": range(1000, 1243), "laterality": "L"}) \
        .to_csv(tmp_path / "train.csv", index=False)
    return images, tmp_path / "train.csv"


def test_preprocess_a_csv_of_another_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Before: '243 failed (see failures.csv)', meta.csv, failures.csv and preprocess.json left
    behind, exit 1."""
    images, csv = _csv_of_other_ids(tmp_path)
    out = tmp_path / "png"
    code = main(["preprocess", "--images", str(images), "--csv", str(csv), "--out", str(out),
                 "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"none of the 243 files train.csv lists exist under {images}" in err, err
    assert err.rstrip().endswith("wrong --images?"), err
    assert not out.exists()


def test_predict_a_csv_of_another_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import types

    import rsna_utils.infer.scoring as scoring
    monkeypatch.setattr(scoring, "load_models", lambda paths, dev: (
        [types.SimpleNamespace(recipe="r", weight=1.0, channels=3, level="image")], {}))
    images, csv = _csv_of_other_ids(tmp_path)
    code = main(["predict", "--images", str(images), "--csv", str(csv), "--checkpoints",
                 str(tmp_path / "best.pt"), "--out", str(tmp_path / "sub.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "none of the 243 files train.csv lists exist under" in err and "wrong --images?" in err
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.heavy
def test_a_decoders_warning_in_a_worker_stays_out_of_quiet(tmp_path):
    """A truncated DICOM: pydicom warns in the worker process. Before: its site-packages path
    and the line `warn_and_log(msg, UserWarning)` came through --quiet; the file's failure is
    in failures.csv either way."""
    from rsna_utils.sources.synth import synthesize
    data = tmp_path / "data"
    synthesize(data, patients=1, test_patients=0, workers=1, progress=False)
    f = sorted((data / "train_images").rglob("*.dcm"))[0]
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    cmd = [sys.executable, "-m", "rsna_utils", "preprocess", "--images",
           str(data / "train_images"), "--csv", str(data / "train.csv"), "--size", "48",
           "--workers", "1"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "q"), "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "site-packages" not in r.stderr, r.stderr
    assert "warn_and_log" not in r.stderr and "UserWarning" not in r.stderr, r.stderr
    assert r.stderr.strip() == "", r.stderr
    assert len(pd.read_csv(tmp_path / "q" / "failures.csv")) == 1
    # without --quiet: one plain line naming the library and what it said
    r = subprocess.run(cmd + ["--out", str(tmp_path / "v")], capture_output=True, text=True,
                       timeout=300)
    assert "rsna preprocess: warning from pydicom: End of file reached" in r.stderr, r.stderr
    assert "site-packages" not in r.stderr and "warn_and_log" not in r.stderr, r.stderr


@pytest.mark.heavy
def test_tests_skipped_for_want_of_the_real_files_are_said_once(tmp_path):
    """Before: `make test-fast` skipped them silently when ../shared/testdata was absent."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/dicom/test_dicom_io.py::test_undecodable_file_names_file_syntax_and_package"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RSNA_TESTDATA": str(tmp_path / "none")})
    assert r.stdout.count("the real DICOM files are not here") == 1, r.stdout
    assert "1 test(s) skipped: the real DICOM files are not here" in r.stdout, r.stdout
    assert "RSNA_TESTDATA" in r.stdout


@pytest.mark.heavy
def test_a_decoders_warning_in_a_predict_worker_stays_out_of_quiet(tmp_path, synth_small,
                                                                   tiny_ckpt):
    """The same truncated file read by `rsna predict`'s DataLoader workers."""
    import shutil
    images = tmp_path / "test_images"
    shutil.copytree(synth_small / "test_images", images)
    f = sorted(images.rglob("*.dcm"))[0]
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "predict", "--images", str(images),
                        "--csv", str(synth_small / "test.csv"), "--checkpoints", str(tiny_ckpt),
                        "--out", str(tmp_path / "s.csv"), "--workers", "1", "--max-unreadable",
                        "1", "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "site-packages" not in r.stderr and "warn_and_log" not in r.stderr, r.stderr
    assert "End of file" not in r.stderr, r.stderr
    assert pd.read_csv(tmp_path / "s_warnings.csv").shape[0] >= 1
