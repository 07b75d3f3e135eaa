import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, recall_score, roc_auc_score

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.metrics import (
    breast_level,
    brier_score,
    expected_calibration_error,
    pfbeta,
    reliability_table,
)
from rsna_utils.reports import evaluate as ev


def _images(patients: int, seed: int = 0, signal: float = 1.5, decimals: int | None = 2):
    """train.csv-like image rows with predictions: 2 breasts x 2 views per patient, both views
    of a positive breast positive; scores rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(patients):
        site, age = int(rng.integers(1, 3)), float(rng.integers(35, 85))
        density = [None, "A", "B", "C", "D"][int(rng.integers(0, 5))]
        for lat in "LR":
            cancer = int(rng.random() < 0.15)
            for view in ("CC", "MLO"):
                rows.append(dict(site_id=site, patient_id=1000 + pid, image_id=len(rows) + 1,
                                 laterality=lat, view=view, age=age, density=density,
                                 machine_id=int(rng.choice([21, 49])), cancer=cancer))
    df = pd.DataFrame(rows)
    df["prediction_id"] = df.patient_id.astype(str) + "_" + df.laterality
    z = signal * df.cancer + rng.normal(size=len(df)) - 2
    p = 1 / (1 + np.exp(-z))
    df["prediction"] = np.round(p, decimals) if decimals is not None else p
    return df


def _loop(y, p, counts_rows, t):
    """The bootstrap the slow way: repeat the rows, call scikit-learn."""
    out = {k: [] for k in ("auc", "pr_auc", "f1", "sensitivity", "specificity", "pf1", "brier", "ece")}
    for w in counts_rows:
        rows = np.repeat(np.arange(len(y)), w)
        yy, pp = y[rows], p[rows]
        two = len(np.unique(yy)) == 2
        out["auc"].append(roc_auc_score(yy, pp) if two else np.nan)
        out["pr_auc"].append(average_precision_score(yy, pp) if yy.sum() else np.nan)
        out["f1"].append(f1_score(yy, pp >= t, zero_division=0))
        out["sensitivity"].append(recall_score(yy, pp >= t, zero_division=0) if yy.sum() else np.nan)
        out["specificity"].append(recall_score(1 - yy, pp < t, zero_division=0)
                                  if (yy == 0).any() else np.nan)
        out["pf1"].append(pfbeta(yy, pp))
        out["brier"].append(brier_score_loss(yy, pp))
        out["ece"].append(expected_calibration_error(yy, pp))
    return {k: np.array(v) for k, v in out.items()}


def test_bootstrap_equals_a_loop_over_the_same_patient_resamples():
    d = ev.load_predictions(_images(30, seed=1, decimals=1))   # many ties
    b = ev.breast_table(d)
    pats, _ = np.unique(d.patient_id.astype(str), return_inverse=True)
    counts = ev.patient_bootstrap_counts(len(pats), 40, seed=5)
    assert (counts.sum(1) == len(pats)).all()           # each resample draws P patients
    code = {p: i for i, p in enumerate(pats)}
    w = counts[:, b.patient_id.astype(str).map(code).to_numpy()]
    # the two breasts of a patient always move together
    both = b.groupby("patient_id").indices
    assert all((w[:, ix] == w[:, ix[:1]]).all() for ix in both.values())
    y, p = b.cancer.to_numpy(), b.prediction.to_numpy()
    fast = ev.resampled_metrics(y, p, w, threshold=0.2)
    slow = _loop(y, p, w, 0.2)
    for k, v in slow.items():
        np.testing.assert_allclose(fast[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    assert np.isfinite(fast["auc"]).sum() > 30


def test_reported_interval_is_the_percentile_of_the_loop_and_point_is_sklearn():
    df = _images(40, seed=2)
    r = ev.evaluate_predictions(df, None, n_boot=60, seed=9, threshold=0.25)
    row = r["metrics"].query("breakdown == 'all' and level == 'breast'").iloc[0]
    b = breast_level(df)
    b = b.join(df.groupby("prediction_id").patient_id.first(), on="prediction_id")
    pats = np.unique(df.patient_id.astype(str))
    counts = ev.patient_bootstrap_counts(len(pats), 60, seed=9)
    w = counts[:, np.searchsorted(pats, b.patient_id.astype(str))]
    y, p = b.cancer.to_numpy(), b.prediction.to_numpy()
    slow = _loop(y, p, w, 0.25)
    for k in ("auc", "pr_auc", "f1", "sensitivity", "ece"):
        v = slow[k][np.isfinite(slow[k])]
        assert row[f"{k}_low"] == pytest.approx(np.percentile(v, 2.5), abs=1e-12), k
        assert row[f"{k}_high"] == pytest.approx(np.percentile(v, 97.5), abs=1e-12), k
    assert row["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-15)
    assert row["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-15)
    assert row["f1"] == pytest.approx(f1_score(y, p >= 0.25))
    assert row["sensitivity"] == pytest.approx(recall_score(y, p >= 0.25))
    assert row["brier"] == pytest.approx(brier_score_loss(y, p))
    assert row["auc_low"] < row["auc"] < row["auc_high"]
    img = r["metrics"].query("breakdown == 'all' and level == 'image'").iloc[0]
    assert img["auc"] == pytest.approx(roc_auc_score(df.cancer, df.prediction))
    assert r["headline"]["threshold_source"] == "given" and r["headline"]["n"] == len(b)


def test_interval_narrows_with_more_patients():
    width = {}
    for n in (60, 960):
        h = ev.evaluate_predictions(_images(n, seed=3, decimals=None), None, n_boot=200)["headline"]
        width[n] = (h["auc_high"] - h["auc_low"], h["sensitivity_high"] - h["sensitivity_low"])
    assert width[960][0] < width[60][0] / 2 and width[960][1] < width[60][1] / 2


def test_brier_and_ece_by_hand():
    y = [0, 0, 1, 1, 1]
    p = [0.05, 0.15, 0.12, 0.95, 1.0]
    # bins of width 0.1: {0.05}, {0.15, 0.12}, {0.95, 1.0} (1.0 in the last bin)
    ece = (1 * abs(0.05 - 0) + 2 * abs(0.135 - 0.5) + 2 * abs(0.975 - 1)) / 5
    assert expected_calibration_error(y, p) == pytest.approx(ece)
    assert brier_score(y, p) == pytest.approx((0.05**2 + 0.15**2 + 0.88**2 + 0.05**2 + 0) / 5)
    t = reliability_table(y, p)
    assert list(t.n) == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2] and np.isnan(t.observed_rate[4])
    one = ev.resampled_metrics(np.array(y), np.array(p), np.ones((1, 5)), 0.5)
    assert one["ece"][0] == pytest.approx(ece) and one["brier"][0] == pytest.approx(brier_score(y, p))


def test_breakdowns_join_train_csv_and_count_right(tmp_path):
    df = _images(50, seed=4)
    meta = df.drop(columns=["prediction"])
    meta.to_csv(tmp_path / "train.csv", index=False)
    oof = df[["patient_id", "image_id", "laterality", "cancer", "prediction"]]   # as oof.py writes
    r = ev.evaluate_predictions(oof, tmp_path / "out", meta_csv=tmp_path / "train.csv", n_boot=20)
    m = r["metrics"]
    assert set(m.breakdown) == {"all", "site_id", "machine_id", "density", "age_band", "view"}
    breasts = df.groupby("prediction_id").first()
    for site, n in breasts.site_id.value_counts().items():
        row = m[(m.breakdown == "site_id") & (m.group == str(site))].iloc[0]
        assert row.n == n and row.level == "breast"
        assert row.n_positives == breasts[breasts.site_id == site].cancer.sum()
        assert row.n_patients == df[df.site_id == site].patient_id.nunique()
    views = m[m.breakdown == "view"].set_index("group")
    assert list(views.index) == ["CC", "MLO"] and (views.level == "image").all()
    assert views.loc["CC", "n"] == (df.view == "CC").sum()
    assert views.loc["CC", "auc"] == pytest.approx(roc_auc_score(df.cancer[df.view == "CC"],
                                                                 df.prediction[df.view == "CC"]))
    dens = m[m.breakdown == "density"]
    assert dens.group.iloc[-1] == "missing" and dens.n.sum() == len(breasts)
    ages = m[m.breakdown == "age_band"]
    assert list(ages.group) == [g for g in ["<50", "50-59", "60-69", "70+"]
                                if g in set(ev.age_band(breasts.age))]
    assert ages.n.sum() == len(breasts)
    for f in ("metrics", "roc", "pr", "reliability", "summary"):
        assert (tmp_path / "out").joinpath(r["files"][f].split("/")[-1]).exists()
    for f in r["figures"].values():
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(r["roc"]) == 201 and (r["roc"].tpr_low <= r["roc"].tpr_high + 1e-12).all()
    assert r["skipped"] == {}


def test_age_bands():
    assert list(ev.age_band([39, 50, 59.9, 60, 70, np.nan])) == \
        ["<50", "50-59", "50-59", "60-69", "70+", "missing"]


def test_breakdowns_skipped_without_meta_and_breast_rows_accepted():
    df = _images(30, seed=5)
    breast = breast_level(df)                    # prediction_id, prediction, cancer only
    r = ev.evaluate_predictions(breast, None, n_boot=10)
    assert set(r["metrics"].breakdown) == {"all"} and "view" in r["skipped"]
    assert "meta_csv" in r["skipped"]["site_id"]
    assert r["headline"]["n_patients"] == 30


def test_errors_name_what_is_wrong(tmp_path):
    df = _images(20, seed=6)
    with pytest.raises(RsnaError, match="no `prediction` column"):
        ev.evaluate_predictions(df.drop(columns="prediction"), None)
    with pytest.raises(RsnaError, match="no `cancer` label.*--meta"):
        ev.evaluate_predictions(df.drop(columns="cancer"), None)
    with pytest.raises(RsnaError, match="no positive breast"):
        ev.evaluate_predictions(df.assign(cancer=0), None)
    with pytest.raises(RsnaError, match="look like logits"):
        ev.evaluate_predictions(df.assign(prediction=df.prediction * 10 - 5), None)
    other = df.assign(image_id=df.image_id + 10**6).drop(columns="prediction")
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(RsnaError, match="none of the 80 image_ids .*other.csv"):
        ev.evaluate_predictions(df.drop(columns="cancer"), None, meta_csv=tmp_path / "other.csv")
    with pytest.raises(RsnaError, match="missing.csv: predictions file not found"):
        ev.evaluate_predictions(tmp_path / "missing.csv", None)
    part = df.drop(columns="cancer")
    with pytest.raises(RsnaError, match="label is missing"):
        ev.evaluate_predictions(part, None, meta_csv=df.iloc[:10])


def test_unreadable_images_are_dropped_and_counted():
    df = _images(20, seed=7)
    df.loc[[0, 5], "prediction"] = np.nan
    r = ev.evaluate_predictions(df, None, n_boot=5)
    assert r["headline"]["dropped_nan"] == 2
    assert r["metrics"].query("level == 'image'").n.iloc[0] == len(df) - 2


def test_cli_evaluates_oof_predictions_with_train_csv(tmp_path, capsys):
    from rsna_utils.app.cli import main
    df = _images(40, seed=8)
    df.drop(columns="prediction").to_csv(tmp_path / "train.csv", index=False)
    df[["patient_id", "image_id", "laterality", "prediction_id", "cancer", "prediction"]].to_csv(
        tmp_path / "oof_predictions.csv", index=False)
    rc = main(["evaluate", "--predictions", str(tmp_path / "oof_predictions.csv"), "--meta",
               str(tmp_path / "train.csv"), "--out", str(tmp_path / "eval"), "--n-boot", "30",
               "--threshold", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0 and "AUC" in out and "(given)" in out and "no " not in out.split("wrote")[0]
    m = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert (m.threshold == 0.2).all() and "view" in set(m.breakdown)
    rc = main(["evaluate", "--predictions", str(tmp_path / "oof_predictions.csv"),
               "--out", str(tmp_path / "e2"), "--n-boot", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "no site_id breakdown" in out


def test_compare_auc_is_paired_and_can_say_no():
    rng = np.random.default_rng(3)
    n = 400
    patients = np.repeat(np.arange(n // 2), 2)
    y = (rng.random(n) < 0.3).astype(int)
    weak = y * 0.3 + rng.random(n)
    strong = y * 1.5 + rng.random(n)
    r = ev.compare_auc(y, weak, strong, patients, n_boot=400)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, weak))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, strong))
    assert r["difference"] > 0 and r["difference_low"] > 0 and r["p_not_better"] < 0.01
    back = ev.compare_auc(y, strong, weak, patients, n_boot=400)     # the other way round
    assert back["difference_high"] < 0 and back["p_not_better"] > 0.99
    same = ev.compare_auc(y, weak, weak, patients, n_boot=100)
    assert same["difference"] == same["difference_low"] == same["difference_high"] == 0
    assert same["p_not_better"] == 1.0                                # a tie is not better
    # two equally noisy models: the interval straddles 0
    other = y * 0.3 + rng.random(n)
    tie = ev.compare_auc(y, weak, other, patients, n_boot=400)
    assert tie["difference_low"] < 0 < tie["difference_high"]
    # paired: resample b is the same patients for both models, so the difference equals the
    # loop over the resamples with sklearn
    counts = ev.patient_bootstrap_counts(n // 2, 5, 0)
    loop = [roc_auc_score(y, strong, sample_weight=c[patients])
            - roc_auc_score(y, weak, sample_weight=c[patients]) for c in counts]
    r5 = ev.compare_auc(y, weak, strong, patients, n_boot=5)
    lo, hi = np.percentile(loop, [2.5, 97.5])
    assert (r5["difference_low"], r5["difference_high"]) == pytest.approx((lo, hi))
    with pytest.raises(RsnaError, match="one class"):
        ev.compare_auc(np.zeros(4), weak[:4], strong[:4], patients[:4])
    with pytest.raises(RsnaError, match="same rows"):
        ev.compare_auc(y, weak[:-1], strong, patients)
    with pytest.raises(RsnaError, match="0 or 1, found \\[2\\]"):
        ev.compare_auc(y * 2, weak, strong, patients)
    with pytest.raises(RsnaError, match="second model's predictions hold 1 NaN"):
        ev.compare_auc(y, weak, np.where(np.arange(n) == 3, np.nan, strong), patients)
    with pytest.raises(RsnaError, match="1 row\\(s\\) have no patient id"):
        ev.compare_auc(y, weak, strong, np.where(np.arange(n) == 3, np.nan, patients))


def test_compare_metric_pairs_pr_auc_and_the_f1_of_binary_calls():
    rng = np.random.default_rng(4)
    n = 400
    patients = np.repeat(np.arange(n // 2), 2)
    y = (rng.random(n) < 0.2).astype(int)
    weak, strong = y * 0.3 + rng.random(n), y * 1.5 + rng.random(n)
    r = ev.compare_metric(y, weak, strong, patients, "pr_auc", n_boot=300)
    assert r["a"] == pytest.approx(average_precision_score(y, weak))
    assert r["b"] == pytest.approx(average_precision_score(y, strong))
    assert r["difference_low"] > 0 and r["p_not_better"] < 0.01
    # binarised calls: pF1 of 0/1 predictions is the F1 of the calls
    ca, cb = (weak >= 1.0).astype(float), (strong >= 1.0).astype(float)
    f = ev.compare_metric(y, ca, cb, patients, "pf1", n_boot=300)
    assert f["a"] == pytest.approx(f1_score(y, ca)) and f["b"] == pytest.approx(f1_score(y, cb))
    assert f["difference"] > 0
    back = ev.compare_metric(y, cb, ca, patients, "pf1", n_boot=300)
    assert back["difference_high"] < 0 and back["p_not_better"] > 0.99
    with pytest.raises(RsnaError, match="metric 'f2': choose auc, pr_auc, pf1 or brier"):
        ev.compare_metric(y, ca, cb, patients, "f2")
