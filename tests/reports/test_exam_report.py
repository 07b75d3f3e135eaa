"""Exam reports (`rsna explain`): figures, index.html, heatmaps.csv, and one-line errors."""
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from rsna_utils.app.cli import main
from rsna_utils.core.errors import RsnaError
from rsna_utils.image.preprocess import PreprocessConfig
from rsna_utils.learn.models import create_model
from rsna_utils.reports.exam import VIEW_COLUMNS, overlay, write_exam_reports

PRE = PreprocessConfig(size=(96, 64)).to_dict()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained resnet18 checkpoint in `rsna train`'s format, with a positive classifier so
    its Grad-CAM is not all zero (more of any feature raises the logit)."""
    torch.manual_seed(0)
    m = create_model("resnet18", global_pool="gem")
    with torch.no_grad():
        m.fc.weight.fill_(0.02)
        m.fc.bias.fill_(-1.0)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    torch.save(dict(model=m.state_dict(), model_name="resnet18", channels=3, size=[96, 64],
                    global_pool="gem", preprocess=PRE, threshold=0.3, aux=[],
                    norm=[[0.5] * 3, [0.25] * 3]), path)
    return path


def test_reports_for_two_exams(tmp_path, synth_small, ckpt):
    images = tmp_path / "images"
    shutil.copytree(synth_small / "test_images", images)
    test = pd.read_csv(synth_small / "test.csv")
    first_two = list(dict.fromkeys(test.patient_id))[:2]
    gone = test[test.patient_id == first_two[1]].iloc[0]
    (images / str(gone.patient_id) / f"{gone.image_id}.dcm").unlink()      # one unreadable view
    r = write_exam_reports(images, synth_small / "test.csv", [ckpt], tmp_path / "out", limit=2,
                           device="cpu", progress=False, order="csv")
    views = pd.read_csv(tmp_path / "out" / "heatmaps.csv")
    assert list(views.columns[:len(VIEW_COLUMNS)]) == VIEW_COLUMNS
    assert sorted(views.patient_id.unique()) == sorted(first_two)
    assert len(views) == int(test.patient_id.isin(first_two).sum())
    bad = views[views.image_id == gone.image_id].iloc[0]
    assert "file not found" in bad.problem and np.isnan(bad.score) and np.isnan(bad.peak_x)
    ok = views[views.problem.isna()]
    assert ok.score.between(0, 1).all() and ok.peak_x.notna().all()
    # peaks are original DICOM pixels: inside the image and inside the breast's crop
    for v in ok.itertuples():
        from rsna_utils.dicom.header import read_header
        h = read_header(images / str(v.patient_id) / f"{v.image_id}.dcm")
        assert 0 <= v.peak_x < h.columns and 0 <= v.peak_y < h.rows
    # the breast score is the mean of its readable views; the decision is at the threshold
    for _, d in ok.groupby(["patient_id", "laterality"]):
        assert d.breast_score.iloc[0] == pytest.approx(d.score.mean())
        assert (d.positive == (d.breast_score >= 0.3)).all()
    assert r["threshold"] == pytest.approx(0.3)
    # one figure per exam, sorted by score in the index
    assert len(r["figures"]) == 2 and all(cv2.imread(f) is not None for f in r["figures"])
    assert list(r["exams"].score) == sorted(r["exams"].score, reverse=True)
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.index(f">{r['exams'].exam[0]}<") < page.index(f">{r['exams'].exam[1]}<")
    assert all(f'src="{f.split("/")[-1]}"' in page for f in r["figures"])
    assert not list((tmp_path / "out").glob(".*tmp*"))          # nothing half-written left


def test_scores_match_rsna_predict(tmp_path, synth_small, ckpt):
    """The report runs the same preprocessing and model input as inference."""
    from rsna_utils.infer.predict import predict
    r = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                           tmp_path / "out", limit=1, device="cpu", progress=False, by="breast",
                           threshold=0.9)
    p = predict(synth_small / "test_images", synth_small / "test.csv", [ckpt], None, workers=0,
                device="cpu", progress=False)
    got = r["views"].merge(p.images, on="image_id")
    assert len(got) == len(r["views"]) >= 1
    np.testing.assert_allclose(got.score, got.prediction, atol=1e-5)
    assert not r["views"].positive.any()          # threshold 0.9 given
    # with the flip, as a submission tuned on flip-averaged scores: `rsna predict --tta`'s
    r = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                           tmp_path / "tta", limit=1, device="cpu", progress=False, by="breast",
                           threshold=0.9, tta=True)
    p = predict(synth_small / "test_images", synth_small / "test.csv", [ckpt], None, workers=0,
                device="cpu", progress=False, tta=True)
    flipped = r["views"].merge(p.images, on="image_id")
    np.testing.assert_allclose(flipped.score, flipped.prediction, atol=1e-5)
    assert np.abs(flipped.score.to_numpy() - got.score.to_numpy()).max() > 1e-6


def test_overlay_keeps_gray_where_there_is_no_heat():
    gray = np.full((4, 4), 100, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1
    rgb = overlay(gray, heat)
    assert rgb.shape == (4, 4, 3) and (rgb[1:, 1:] == 100).all() and (rgb[0, 0] != 100).any()


def _explain(capsys, *args):
    code = main(["explain", *map(str, args), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_errors_are_one_line(tmp_path, capsys, synth_small, ckpt):
    out = tmp_path / "out"
    code, err = _explain(capsys, "--images", tmp_path / "nope", "--csv", synth_small / "test.csv",
                         "--checkpoints", ckpt, "--out", out)
    assert code == 2 and "nope: images folder not found" in err and "\n" not in err
    bad_csv = tmp_path / "bad.csv"
    pd.DataFrame({"patient_id": [1], "image_id": [2]}).to_csv(bad_csv, index=False)
    code, err = _explain(capsys, "--images", synth_small / "test_images", "--csv", bad_csv,
                         "--checkpoints", ckpt, "--out", out)
    assert code == 2 and "bad.csv: missing column(s) ['laterality']" in err and "\n" not in err
    code, err = _explain(capsys, "--images", synth_small / "test_images", "--csv",
                         synth_small / "test.csv", "--checkpoints", tmp_path / "missing.pt",
                         "--out", out)
    assert code == 2 and "missing.pt: checkpoint not found" in err and "\n" not in err
    code, err = _explain(capsys, "--images", synth_small / "test_images", "--csv",
                         synth_small / "test.csv", "--checkpoints", ckpt, "--out", out,
                         "--limit", 0)
    assert code == 2 and "limit=0: give an integer >= 1" in err
    assert not out.exists()
    with pytest.raises(RsnaError, match="by='exam'"):
        write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt], out,
                           by="exam")


def test_cli_writes_the_report(tmp_path, capsys, synth_small, ckpt):
    code = main(["explain", "--images", str(synth_small / "test_images"), "--csv",
                 str(synth_small / "test.csv"), "--checkpoints", str(ckpt), "--out",
                 str(tmp_path / "out"), "--limit", "1", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "explained" in capsys.readouterr().out
    assert (tmp_path / "out" / "index.html").exists() and (tmp_path / "out" / "heatmaps.csv").exists()


def test_limit_keeps_the_highest_scores_and_the_truth_is_drawn(tmp_path, synth_small, ckpt):
    """`--limit N` explains the N highest-scored exams, not the first N of the CSV; with labels
    and lesion boxes the figure and the tables carry the truth."""
    everyone = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                                  tmp_path / "all", device="cpu", progress=False, order="csv")
    top = everyone["exams"].sort_values("score", ascending=False).iloc[0]
    first = pd.read_csv(synth_small / "test.csv").patient_id.iloc[0]
    labels = tmp_path / "labels.csv"
    pd.read_csv(synth_small / "test_labels.csv").to_csv(labels, index=False)
    r = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                           tmp_path / "top", device="cpu", progress=False, limit=1,
                           labels=labels, lesions=synth_small / "lesions.csv")
    assert list(r["exams"]["exam"]) == [top["exam"]]
    assert r["exams"]["score"].iloc[0] == pytest.approx(top["score"], abs=1e-6)
    csv_first = write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                                   tmp_path / "csv", device="cpu", progress=False, limit=1,
                                   order="csv")
    assert list(csv_first["exams"]["exam"]) == [first]
    truth = pd.read_csv(synth_small / "test_labels.csv").groupby("patient_id").cancer.max()
    assert r["exams"]["truth"].iloc[0] == truth[top["exam"]]
    assert set(r["views"]["truth"].dropna()) <= {0, 1}
    page = (tmp_path / "top" / "index.html").read_text()
    assert "truth: cancer" in page or "truth: no cancer" in page
    with pytest.raises(RsnaError, match="labels.csv: needs the columns image_id and cancer"):
        pd.DataFrame({"image_id": [1]}).to_csv(labels, index=False)
        write_exam_reports(synth_small / "test_images", synth_small / "test.csv", [ckpt],
                           tmp_path / "bad", device="cpu", progress=False, labels=labels)


def test_explain_takes_the_ensemble_as_the_submission_scores(tmp_path, capsys, synth_small, ckpt):
    """`ensemble=` (a path or a loaded `LoadedEnsemble`) and `rsna explain --ensemble`: its
    members, threshold and aggregation, without the notebook spelling them from a dict."""
    from rsna_utils.infer.ensemble import Ensemble
    from rsna_utils.infer.kaggle import export_models
    from rsna_utils.infer.scoring import LoadedEnsemble
    models = tmp_path / "models"
    export_models(Ensemble({"checkpoints": [str(ckpt)], "threshold": 0.123, "agg": "max",
                            "binarize": "threshold", "tta": False}), models)
    args = (synth_small / "test_images", synth_small / "test.csv")
    kw = dict(limit=1, order="csv", device="cpu", progress=False)
    from_json = write_exam_reports(*args, out=tmp_path / "j", ensemble=models / "ensemble.json",
                                   **kw)
    by_hand = write_exam_reports(*args, [ckpt], tmp_path / "h", threshold=0.123, agg="max", **kw)
    assert from_json["threshold"] == by_hand["threshold"] == 0.123
    cols = ["image_id", "score", "breast_score", "positive"]
    pd.testing.assert_frame_equal(from_json["views"][cols], by_hand["views"][cols])
    mean = write_exam_reports(*args, [ckpt], tmp_path / "m", threshold=0.123, **kw)
    assert not np.allclose(mean["views"]["breast_score"], by_hand["views"]["breast_score"])
    loaded = LoadedEnsemble.from_json(models, torch.device("cpu"))
    again = write_exam_reports(*args, out=tmp_path / "l", ensemble=loaded, **kw)
    pd.testing.assert_frame_equal(again["views"][cols], by_hand["views"][cols])
    with pytest.raises(RsnaError, match="threshold given with a loaded ensemble"):
        write_exam_reports(*args, out=tmp_path / "t", ensemble=loaded, threshold=0.5, **kw)
    code = main(["explain", "--images", str(args[0]), "--csv", str(args[1]), "--ensemble",
                 str(models), "--out", str(tmp_path / "cli"), "--limit", "1", "--quiet",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "threshold 0.1230" in capsys.readouterr().out
    with pytest.raises(RsnaError, match="tuned on max-aggregated breasts but --agg is mean"):
        write_exam_reports(*args, out=tmp_path / "x", ensemble=models, agg="mean", **kw)
