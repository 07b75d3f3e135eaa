"""What a user sees of a run (issue 40, items 1 and 5): the report's headline with its
patient-bootstrap intervals and the submission's sensitivity and specificity at its cut,
figures that say which patients they are on and can be read, pF1 named for what it is scored
on, the training log on stdout, and notebook text that follows the data it sits under."""
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from rsna_utils.app.notebooks import find_notebooks
from rsna_utils.reports import eda, evaluate, plots
from rsna_utils.reports import html as report

NOTEBOOKS = find_notebooks()


def _held_out_run(run: Path, flagged_ids=("p0_L",)) -> None:
    """A run folder whose prediction had labels: 12 patients, 24 breasts, 4 with cancer, two
    views each; the binarised submission flags `flagged_ids`."""
    rows = []
    for i in range(12):
        for lat in "LR":
            cancer = int(i < 4 and lat == "L")
            for view in ("CC", "MLO"):
                rows.append({"patient_id": f"p{i}", "laterality": lat, "view": view,
                             "image_id": f"p{i}{lat}{view}", "prediction_id": f"p{i}_{lat}",
                             "cancer": cancer,
                             "prediction": 0.6 + 0.05 * i if cancer else 0.05 + 0.01 * i})
    im = pd.DataFrame(rows)
    im.to_csv(run / "submission_images.csv", index=False)
    ids = im.prediction_id.unique()
    pd.DataFrame({"prediction_id": ids, "cancer": [int(p in flagged_ids) for p in ids]}).to_csv(
        run / "submission.csv", index=False)


def test_the_headline_carries_intervals_and_the_cuts_sensitivity_and_specificity(tmp_path):
    run = tmp_path / "demo"
    run.mkdir()
    _held_out_run(run)
    (run / "ensemble.json").write_text(json.dumps({"auc": 0.8, "pf1": 0.5, "prob_pf1": 0.2,
                                                   "threshold": 0.4, "runs": []}))
    rows = report.run_scores(run)
    held = rows[0]
    assert held["what"] == "held-out test patients"
    assert held["breasts"] == 24 and held["positive"] == 4 and held["flagged"] == 1
    auc, lo, hi = held["breast AUC"]
    assert auc == pytest.approx(1.0) and lo <= auc <= hi
    sens = held["sensitivity at the cut"]
    assert sens[0] == pytest.approx(0.25) and sens[1] <= 0.25 <= sens[2] and sens[2] > sens[1]
    assert held["specificity at the cut"][0] == pytest.approx(1.0)
    # pF1 of the binarised calls is their F1: precision 1, recall 1/4
    assert held["pF1 (binarised at the cut)"][0] == pytest.approx(2 * 0.25 / 1.25)
    line = report.headline(held)
    assert re.search(r"breast AUC 1\.000 \[\d\.\d{3}, 1\.000\]", line), line
    assert "flags 1 breast and catches 1 of the 4 cancers" in line
    assert re.search(r"sensitivity at the cut 0\.250 \[0\.000, \d\.\d{3}\]", line), line
    assert "specificity at the cut 1.000" in line and "bootstrap resamples of the patients" in line
    page = report.write_index(run, "demo", []).read_text()
    assert '<p class="headline">Held-out test patients' in page
    assert re.search(r"<td class=\"num\">0\.250<br><small>\[0\.000, \d\.\d{3}\]</small></td>",
                     page)                                                    # in the table too
    # pF1 named for what it is, on every row; no bare "breast pF1" column
    assert "pF1 (binarised at the cut)</th>" in page and "pF1 (probabilities)</th>" in page
    assert "breast pF1" not in page
    oof = next(r for r in rows if r["what"] == "out-of-fold ensemble")
    assert oof["pF1 (binarised at the cut)"] == 0.5 and oof["pF1 (probabilities)"] == 0.2


def test_a_probability_submission_has_no_binarised_pf1(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    _held_out_run(run)
    sub = pd.read_csv(run / "submission.csv").assign(cancer=lambda d: d.cancer * 0.7 + 0.1)
    sub.to_csv(run / "submission.csv", index=False)
    held = report.run_scores(run)[0]
    assert "pF1 (binarised at the cut)" not in held and "not binarised" in held["how"]
    assert held["flagged"] == 1 and held["sensitivity at the cut"][0] == pytest.approx(0.25)


def test_patient_intervals_resample_patients_as_the_evaluation_does():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(10), np.zeros(30)].astype(int)
    p = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
    patients = np.repeat(np.arange(20), 2)
    r = evaluate.patient_intervals(y, p, patients, threshold=0.5, n_boot=200, seed=1)
    assert r["n_patients"] == 20 and r["n_boot_valid"] > 150
    for k in ("auc", "sensitivity", "specificity", "pf1"):
        assert r[f"{k}_low"] <= r[k] <= r[f"{k}_high"], k
    # the same numbers as the study's own bootstrap on the same rows
    df = pd.DataFrame({"prediction_id": [f"{i}_L" for i in range(40)], "patient_id":
                       patients.astype(str), "cancer": y, "prediction": p})
    full = evaluate.evaluate_predictions(df, threshold=0.5, n_boot=200, seed=1)["headline"]
    assert r["auc"] == pytest.approx(full["auc"])


def _titles(fig) -> str:
    return " | ".join(ax.get_title() for ax in fig.axes)


def test_every_evaluation_figure_names_the_patients_it_is_on(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    df = pd.DataFrame({"patient_id": np.repeat(np.arange(n // 4), 4).astype(str),
                       "laterality": np.tile(list("LLRR"), n // 4), "image_id": range(n),
                       "cancer": (rng.random(n) < 0.3).astype(int)})
    df["prediction"] = np.clip(df.cancer * 0.4 + rng.random(n) * 0.6, 0, 1)
    df.to_csv(tmp_path / "oof_predictions.csv", index=False)
    res = evaluate.evaluate_predictions(tmp_path / "oof_predictions.csv", tmp_path / "ev",
                                        n_boot=50)
    h = res["headline"]
    assert h["population"] == "out-of-fold training patients"
    titles = _titles(plots.roc_pr_bands(res["roc"], res["pr"], h))
    assert titles.count(f"out-of-fold training patients: {h['n']} breasts") == 2, titles
    assert "out-of-fold training patients" in _titles(
        plots.reliability_diagram(res["reliability"], h))
    assert "out-of-fold training patients" in _titles(
        plots.breakdown_forest(res["metrics"], population=h["population"]))
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["headline"][
        "population"] == "out-of-fold training patients"
    assert evaluate.population_of("runs/x/submission_images.csv") == "held-out test patients"
    assert evaluate.population_of("runs/x/val_predictions.csv") == "validation patients"
    t = _titles(plots.roc_pr_confusion(df, 0.5))
    assert t.count("validation patients") == 3, t
    # the report's links say it too
    run = tmp_path / "run"
    (run / "explain").mkdir(parents=True)
    evaluate.evaluate_predictions(tmp_path / "oof_predictions.csv", run / "explain" / "evaluation",
                                  n_boot=20)
    page = report.write_index(run, "demo", []).read_text()
    assert "evaluation on the out-of-fold training patients: roc pr" in page


def _notebook(path: Path, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    for tags, png in cells:
        c = nbformat.v4.new_code_cell("show()", metadata={"tags": tags} if tags else {})
        c.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
        nb.cells.append(c)
    nbformat.write(nb, path)
    return path


def test_the_key_figure_is_the_tagged_one_and_shown_large(tmp_path):
    nb = _notebook(tmp_path / "05.ipynb", [([], "AAAA"), (["key-figure"], "QUJD"), ([], "REVG")])
    assert report.key_figure(nb) == "QUJD"
    assert report.key_figure(_notebook(tmp_path / "x.ipynb", [([], "AAAA"), ([], "REVG")])) == "REVG"
    # step 05 tags its ROC/PR display, not the reliability diagram it shows last
    five = nbformat.read(NOTEBOOKS / "05_explain_evaluate.ipynb", as_version=4)
    tagged = [c for c in five.cells if "key-figure" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "['roc_pr']" in tagged[0].source
    # the report shows figures at a readable width (at least 600 px), not 340-420 px thumbnails
    run = tmp_path / "run"
    run.mkdir()
    page = report.write_index(run, "demo", [dict(step="05", notebook=str(nb), seconds=1)]).read_text()
    assert 'class="fig"' in page and "max-width:420px" not in page
    width = int(re.search(r"img\.fig\{\{?max-width:(\d+)px", page).group(1))
    assert width >= 600


def test_positives_by_is_a_grid_not_a_row():
    rng = np.random.default_rng(0)
    n = 60
    train = pd.DataFrame({c: rng.integers(0, 3, n) for c in
                          ("site_id", "machine_id", "density", "BIRADS", "implant")})
    train = train.assign(view=rng.choice(["CC", "MLO"], n), laterality=rng.choice(["L", "R"], n),
                         cancer=(rng.random(n) < 0.2).astype(int))
    train["density"] = train["density"].astype(float).where(train.index % 5 > 0)    # NaN: missing
    train["machine_id"] = train["machine_id"].map({0: 21, 1: 170, 2: 49})
    fig = plots.positives_by(train)
    ticks = {ax.get_title(): [t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes
             if ax.get_title()}
    assert ticks["density"][-1] == "missing" and ticks["density"][0] == "0"    # not 0.0, nor dropped
    assert ticks["machine_id"] == ["21", "49", "170"]                          # numeric order
    w, h = fig.get_size_inches()
    assert w / h < 2.5, (w, h)                 # was 22.4 x 3 in: 2217 x 290 px
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_title()]
    assert len(shown) == 7


def test_learning_curve_legends_cover_no_curve_and_equal_curves_stay_visible():
    m = pd.DataFrame({"epoch": range(4), "train_loss": [1, .8, .7, .6],
                      "image_log_loss": [.9, .8, .75, .7], "image_auc": [.5, .6, .7, .8],
                      "image_pf1": [.1, .2, .2, .3], "breast_mean_best_f1": [.3, .4, .5, .6]})
    m = m.assign(breast_mean_auc=m.image_auc, breast_mean_pf1=m.image_pf1)   # a breast model
    fig = plots.learning_curves(m)
    for ax in fig.axes:
        leg = ax.get_legend()
        # below the axes: its anchor sits under the plotting area
        assert leg is not None
        anchor = leg.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
        assert anchor.y0 < 0, ax.get_title()
        lines = ax.get_lines()
        styles = {(ln.get_marker(), ln.get_linestyle()) for ln in lines}
        assert len(styles) == len(lines), ax.get_title()     # no curve hides another
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("equals the curve above" in t for t in labels), labels
    assert "validation patients" in fig.axes[1].get_title()


def test_the_training_log_goes_to_stdout_and_in_order(tmp_path, synth_small, capsys):
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    from rsna_utils.learn.train import TrainConfig, train
    png = tmp_path / "png"
    Preprocessor(PreprocessConfig(size=48), workers=0, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", png)
    capsys.readouterr()
    train(TrainConfig(data=str(png), csv=str(synth_small / "train.csv"), out=str(tmp_path / "r"),
                      model="resnet18", size=48, epochs=2, batch_size=8, workers=0, device="cpu",
                      max_steps=2, progress=False, val_frac=0.3))
    out, err = capsys.readouterr()
    assert "epoch 0: loss" in out and "epoch 1: loss" in out, out
    assert "balance: " in out
    assert "epoch 0: loss" not in err and "balance: " not in err
    assert "breast pF1 (probabilities)" in out
    assert "random weights" in err          # a warning stays on stderr


def test_the_eda_balance_text_follows_the_data_it_sits_under():
    def table(rate, n=800, seed=0):
        rng = np.random.default_rng(seed)
        return pd.DataFrame({"patient_id": np.repeat(np.arange(n // 4), 4),
                             "laterality": np.tile(list("LLRR"), n // 4),
                             "cancer": (rng.random(n) < rate).astype(int)})
    rich, rare = table(0.15), table(0.03)
    a, b = eda.balance_note(rich), eda.balance_note(rare)
    assert f"{rich.cancer.mean():.1%} of the images are positive" in a
    assert f"{rare.cancer.mean():.1%} of the images are positive" in b
    assert "already" in a and "pos_weight 1" in a and "e.g. 5" not in a
    assert re.search(r"each positive would be seen \d+\.\d times an epoch", b), b
    nb = nbformat.read(NOTEBOOKS / "01_eda.ipynb", as_version=4)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "pos_weight`, e.g. 5" not in md and "With 2% positives" not in md
    assert any("eda.balance_note(train)" in c.source and "class_balance" in c.source
               for c in nb.cells if c.cell_type == "code")


def test_notebook_03_says_what_the_kaggle_plans_balance_is():
    plan = yaml.safe_load((NOTEBOOKS / "plans" / "kaggle.yaml").read_text())
    common = plan["common"]
    assert common["pos_weight"] == 1.0 and common["target_ratio"] == "1:7"
    nb = nbformat.read(NOTEBOOKS / "03_train.ipynb", as_version=4)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    said = re.search(r"`kaggle` plan uses .*?\.", md, re.S).group(0)
    assert "`pos_weight` 1" in md and '"1:7"' in md, said
    assert "no loss\n  weight" not in md and "no loss weight" not in md


def test_pf1_is_named_for_what_it_is_in_the_notebooks_and_tables():
    from rsna_utils.reports import tables
    t = tables.metrics_table({"breast_mean_pf1": 0.3, "breast_mean_best_f1": 0.5,
                              "breast_mean_auc": 0.8})
    assert {"pF1 (probabilities)", "pF1 (binarised at the best threshold)"} <= set(t.columns)
    nb = nbformat.read(NOTEBOOKS / "03_train.ipynb", as_version=4)
    heads = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## pF1")]
    assert heads and "pF1 (probabilities)" in heads[0] and "binarised" in heads[0]
