"""An HTML report of a notebook run: each executed notebook as HTML beside it, and an
`index.html` with the steps, their durations, a key figure of each, the final scores and links.

Written after every step (a run that stops half-way still has a report naming where it
stopped) from what the run left on disk: the executed notebooks, the training runs'
metrics.csv, the ensemble's ensemble.json and submission.csv.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import write_atomic

INDEX = "index.html"


def notebook_html(ipynb: str | Path) -> Path:
    """Executed notebook -> HTML beside it (figures embedded). Returns the HTML path."""
    import nbformat
    from nbconvert import HTMLExporter
    ipynb = Path(ipynb)
    nb = nbformat.read(ipynb, as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    out = ipynb.with_suffix(".html")
    write_atomic(out, body)
    return out


KEY_TAG = "key-figure"


def key_figure(ipynb: str | Path) -> str | None:
    """A notebook's summary figure (base64 PNG): the last one shown by a cell tagged
    `key-figure` (05 tags its ROC/PR, not the reliability diagram it shows last), else the
    last PNG it shows."""
    import nbformat
    nb = nbformat.read(Path(ipynb), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if KEY_TAG in c.get("metadata", {}).get("tags", [])]
    for cells in (tagged, code):
        pngs = [o["data"]["image/png"] for c in cells for o in c.get("outputs", [])
                if "image/png" in o.get("data", {})]
        if pngs:
            return pngs[-1].replace("\n", "")
    return None


def run_scores(run_dir: str | Path) -> list[dict]:
    """The scores found under the run, the one that matters first: the held-out test patients
    (the submission's own images with their labels, `<submission>_images.csv`: never trained
    or tuned on), the ensemble's out-of-fold result (ensemble.json; named for what it is: a
    shared holdout that also tuned the threshold is said to be one), each model's best
    validation epoch (metrics.csv) and its vote in the ensemble, the submission's size."""
    run_dir = Path(run_dir)
    rows = []
    ens = _ensemble(run_dir)
    held = _held_out(run_dir / "submission_images.csv", run_dir / "submission.csv")
    if held:
        rows.append(held)
    if ens and (ens.get("auc") is not None or ens.get("pf1") is not None):
        rows.append({"what": "out-of-fold ensemble", "how": _oof_note(ens) + _cut_note(ens),
                     "breasts": ens.get("n_breasts"), "positive": ens.get("n_positives"),
                     "breast AUC": ens.get("auc"), "breast PR-AUC": ens.get("pr_auc"),
                     "pF1 (binarised at the cut)": ens.get("pf1"),
                     "pF1 (probabilities)": ens.get("prob_pf1"), "threshold": ens.get("threshold")})
    for m in sorted(run_dir.glob("*/metrics.csv")):
        try:
            df = pd.read_csv(m)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        key = "breast_mean_auc" if "breast_mean_auc" in df else None
        if key is None or df[key].isna().all():
            continue
        best = df.loc[df[key].idxmax()]
        vote = _vote(ens or {}, m.parent)
        rows.append({"what": f"model {m.parent.name}", "how": _start(m.parent) + "best validation epoch "
                     + f"{int(best.get('epoch', -1))}" + (f"; vote in the ensemble {vote:.0%}"
                                                         if vote is not None else ""),
                     "breast AUC": best[key], "breast PR-AUC": best.get("breast_mean_pr_auc"),
                     "pF1 (probabilities)": best.get("breast_mean_pf1")})
    sub = run_dir / "submission.csv"
    if sub.exists() and not held:
        s = pd.read_csv(sub)
        rows.append({"what": "submission.csv", "how": "no labels: not scored",
                     "breasts": len(s), "flagged": int((s["cancer"] >= 0.5).sum())
                     if "cancer" in s else None})
    return rows


def _start(run: Path) -> str:
    """How a training run started, from its config.json: a model from random weights on a
    small set is plumbing, and its card says so."""
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(cfg, dict):
        return ""
    if cfg.get("pretrained_path"):
        return f"{cfg.get('model')} from pretrained weights; "
    return f"{cfg.get('model')} from random weights (learns little on a small set); "


def _ensemble(run_dir: Path) -> dict | None:
    """The run's ensemble.json (the one at its top; else the first below it)."""
    found = [run_dir / "ensemble.json"] + sorted(run_dir.glob("*/ensemble.json"))
    for e in found:
        try:
            d = json.loads(e.read_text()) if e.is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            return d
    return None


def _oof_note(ens: dict) -> str:
    """What the out-of-fold figure is: folds, or one validation holdout that the threshold was
    tuned on too (then optimistic)."""
    folds = {json.dumps(r.get("fold")) for r in ens.get("runs", []) if isinstance(r, dict)}
    n_runs = len(ens.get("runs", []))
    if n_runs and len(folds) == 1:
        return (f"{n_runs} models validated on one shared holdout; the threshold was tuned on "
                "these same breasts, so its pF1 (binarised at the cut) is optimistic")
    return f"{n_runs} runs, each breast scored by the model that did not train on it"


def _vote(ens: dict, run_dir: Path) -> float | None:
    """A training run's model's share of the ensemble's vote (ensemble.json's runs and weights)."""
    weights = ens.get("weights") or {}
    for r in ens.get("runs", []):
        if isinstance(r, dict) and Path(str(r.get("run", ""))).name == run_dir.name:
            w = weights.get(str(r.get("model")))
            return float(w) if w is not None else None
    return None


N_BOOT = 1000          # patient-bootstrap resamples of the headline's intervals


def _held_out(images_csv: Path, submission: Path) -> dict | None:
    """The held-out test score, each with its patient-bootstrap 95% interval
    (`evaluate.patient_intervals`: patients resampled with their breasts): breast AUC, PR-AUC
    and pF1 of the probabilities (mean of the views), and of the submitted values the pF1,
    sensitivity and specificity at the submission's cut (a breast is flagged at 1, or at a
    probability of 0.5 or more), when the prediction run had labels (`predict --labels`)."""
    from rsna_utils.learn import metrics
    from rsna_utils.reports import evaluate
    try:
        im = pd.read_csv(images_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if "cancer" not in im or im["cancer"].isna().all():
        return None
    b = metrics.breast_level(im.dropna(subset=["cancer"]), "prediction", "cancer")
    patients = b["prediction_id"].astype(str).str.rsplit("_", n=1).str[0]
    y, p = b["cancer"].astype(int).to_numpy(), b["prediction"].fillna(0).to_numpy()
    prob = evaluate.patient_intervals(y, p, patients, n_boot=N_BOOT)
    row = {"what": "held-out test patients",
           "how": "never trained or tuned on: the score that matters",
           "breasts": len(b), "positive": int(b["cancer"].sum()),
           "n_patients": int(patients.nunique()), "n_boot": N_BOOT,
           "breast AUC": _with_ci(prob, "auc"), "breast PR-AUC": _with_ci(prob, "pr_auc"),
           "pF1 (probabilities)": _with_ci(prob, "pf1")}
    try:
        s = pd.read_csv(submission)
        values = b[["prediction_id"]].merge(s[["prediction_id", "cancer"]], on="prediction_id",
                                            how="left")["cancer"]
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return row
    if values.isna().all():
        return row
    v = values.fillna(0).to_numpy(dtype=float)
    flagged = (v >= 0.5).astype(float)
    cut = evaluate.patient_intervals(y, flagged, patients, threshold=0.5, n_boot=N_BOOT)
    row["flagged"] = int(flagged.sum())
    row["caught"] = int(flagged[y == 1].sum())
    row["sensitivity at the cut"] = _with_ci(cut, "sensitivity")
    row["specificity at the cut"] = _with_ci(cut, "specificity")
    if set(np.unique(v)) <= {0.0, 1.0}:     # a binarised submission: its pF1 is at the cut
        row["pF1 (binarised at the cut)"] = _with_ci(cut, "pf1")
    else:
        row["how"] += "; the submission is probabilities (not binarised)"
    return row


def _with_ci(r: dict, k: str) -> tuple[float, float, float]:
    """(value, 95% low, 95% high) of a metric of `evaluate.patient_intervals`."""
    return (float(r[k]), float(r[f"{k}_low"]), float(r[f"{k}_high"]))


def _ci_text(v) -> str:
    """0.975 [0.909, 1.000] of a (value, low, high); a plain value as 0.975."""
    if isinstance(v, tuple):
        val, lo, hi = v
        if val != val:
            return ""
        return f"{val:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo == lo and hi == hi else "")
    return f"{v:.3f}"


def headline(row: dict) -> str:
    """The held-out row in one sentence, each score with its interval: what the submission
    catches and what it costs, e.g. "Held-out test patients (12 patients, 24 breasts, 4 with
    cancer): breast AUC 0.975 [0.909, 1.000]. The submission flags 1 breast and catches 1 of the
    4 cancers: sensitivity at the cut 0.250 [0.000, 1.000], specificity ...; pF1 (binarised at
    the cut) 0.400 [...]"."""
    pos = row.get("positive")
    parts = [f"Held-out test patients ({row.get('n_patients', '?')} patients, "
             f"{row.get('breasts')} breasts, {pos} with cancer): breast AUC "
             f"{_ci_text(row['breast AUC'])}, pF1 (probabilities) "
             f"{_ci_text(row['pF1 (probabilities)'])}."]
    if "flagged" in row:
        f = row["flagged"]
        parts.append(f"The submission flags {f} breast{'s' if f != 1 else ''} and catches "
                     f"{row['caught']} of the {pos} cancers: sensitivity at the cut "
                     f"{_ci_text(row['sensitivity at the cut'])}, specificity at the cut "
                     f"{_ci_text(row['specificity at the cut'])}"
                     + (f", pF1 (binarised at the cut) "
                        f"{_ci_text(row['pF1 (binarised at the cut)'])}"
                        if "pF1 (binarised at the cut)" in row else "") + ".")
    parts.append(f"(95% intervals: {row.get('n_boot', N_BOOT)} bootstrap resamples of the "
                 "patients, each with all their breasts.)")
    return " ".join(parts)


SCORE_COLUMNS = ("what", "breasts", "positive", "flagged", "breast AUC", "breast PR-AUC",
                 "sensitivity at the cut", "specificity at the cut", "pF1 (binarised at the cut)",
                 "pF1 (probabilities)", "threshold", "how")


def _cut_note(ens: dict) -> str:
    """Both ways to binarise that the out-of-fold scores give: the tuned threshold, and the
    share of breasts it flags there (the positive rate that `--binarize quantile` flags)."""
    t, q = ens.get("threshold"), ens.get("quantile")
    if t is None or q is None:
        return ""
    return (f"; the threshold {t:.4f} flags {q:.1%} of the out-of-fold breasts: the submission "
            f"binarises at {ens.get('binarize', 'threshold')} (either the threshold, or the top "
            f"{q:.1%} of the test breasts)")


def scores_table(rows: list[dict]) -> str:
    """The scores as an HTML table: counts as integers, scores to 3 decimals with their 95%
    interval where there is one, empty cells blank; the columns explained under it."""
    if not rows:
        return "<p>No scores yet.</p>"
    cols = [c for c in SCORE_COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(c, v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if c in ("breasts", "positive", "flagged"):
            return f"{int(v):,}"
        if isinstance(v, tuple):
            return _ci_text(v)
        return f"{v:.3f}" if isinstance(v, (float, int)) and not isinstance(v, bool) else str(v)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    def td(c, v):          # a score and its interval on one line; the words wrap
        text = html.escape(cell(c, v))
        if isinstance(v, tuple) and " [" in text:
            text = text.replace(" [", "<br><small>[", 1) + "</small>"
        return f'<td class="{c if c in ("how", "what") else "num"}">{text}</td>'
    body = "".join("<tr>" + "".join(td(c, r.get(c)) for c in cols) + "</tr>" for r in rows)
    note = ("<p><small>[low, high]: the 95% interval of a patient bootstrap. flagged: breasts the "
            "submission calls back (value 1, or a probability of 0.5 or more); sensitivity and "
            "specificity at the cut: of those calls. pF1: the competition's probabilistic F1 at "
            "breast level, of the binarised calls (binarised at the cut: the F1 of the calls) or "
            "of the probabilities (mean of the views). Model rows: their best validation epoch, "
            "on their own validation patients.</small></p>")
    return f'<table class="scores"><tr>{head}</tr>{body}</table>{note}'


SOURCE_HEADERS = {"source": "source", "sites": "sites", "train_images": "training images",
                  "train_positives": "positive", "weight": "weight",
                  "draws_per_epoch": "draws an epoch", "epoch_share": "share of the epoch",
                  "val_images": "validation images", "val_positives": "positive",
                  "val_breast_auc": "validation breast AUC"}


def sources_section(run_dir: str | Path) -> str:
    """The training runs that mixed sources (their sources.csv, `learn.mix`): per source the
    training images, weight, draws an epoch and share, the validation images and, where a run
    validated on several sources, each one's breast AUC. Runs with the same table share it.
    Empty when no run mixed sources."""
    from rsna_utils.learn.mix import run_sources
    tables: dict[str, list[str]] = {}
    for f in sorted(Path(run_dir).glob("*/sources.csv")):
        t = run_sources(f.parent)
        if t is None or len(t) < 2:
            continue
        cols = [c for c in SOURCE_HEADERS if c in t]

        def cell(c, v):
            if v is None or (isinstance(v, float) and v != v):
                return ""
            if c == "epoch_share":
                return f"{v:.1%}"
            if c in ("draws_per_epoch", "weight"):
                return f"{v:g}" if c == "weight" else f"{v:,.1f}"
            return f"{v:.3f}" if isinstance(v, float) else str(v)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c, r[c]))}</td>" for c in cols)
                       + "</tr>" for r in t.to_dict("records"))
        head = "".join(f"<th>{html.escape(SOURCE_HEADERS[c])}</th>" for c in cols)
        tables.setdefault(f"<table><tr>{head}</tr>{body}</table>", []).append(f.parent.name)
    if not tables:
        return ""
    parts = "".join(f"<p>{html.escape(', '.join(runs))}</p>{table}"
                    for table, runs in tables.items())
    return ("<h2>Sources</h2><p><small>Training on a mix: each source's images, its sampling "
            "weight, the images drawn of it an epoch (mean of 8 seeded epochs, upsampling "
            "included) and their share; validation only on the val_sites (RSNA by "
            "default).</small></p>" + parts)


def _evaluated_on(folder: Path) -> str:
    """Who an evaluation folder's figures are on: its summary.json's `population`."""
    try:
        h = json.loads((folder / "summary.json").read_text()).get("headline", {})
    except (OSError, ValueError, AttributeError):
        return "labelled predictions"
    return str(h.get("population") or "labelled predictions")


def write_index(run_dir: str | Path, plan: str, steps: list[dict], failed: str | None = None,
                pending: list[str] = ()) -> Path:
    """steps: dicts with step, notebook, seconds (and html). Returns the index path."""
    run_dir = Path(run_dir)
    rows = []
    for s in steps:
        nb = Path(s["notebook"])
        link = Path(s.get("html") or nb).name
        fig = key_figure(nb) if nb.exists() else None
        img = ""
        if fig:        # the figure as a file too, so that a click opens it full size
            import base64
            png = run_dir / "figures" / f"{s['step']}.png"
            png.parent.mkdir(exist_ok=True)
            write_atomic(png, base64.b64decode(fig))
            img = (f'<a href="figures/{html.escape(png.name)}" title="open full size">'
                   f'<img src="data:image/png;base64,{fig}" class="fig"></a>')
        rows.append(f'<tr><td><a href="{html.escape(link)}">{html.escape(s["step"])}</a></td>'
                    f'<td>{s["seconds"]:.1f} s</td><td>{img}</td></tr>')
    for name in pending:
        rows.append(f"<tr><td>{html.escape(name)}</td><td>not run</td><td></td></tr>")
    scores = run_scores(run_dir)
    held = next((r for r in scores if r.get("what") == "held-out test patients"), None)
    score_html = ((f'<p class="headline">{html.escape(headline(held))}</p>' if held else "")
                  + scores_table(scores))
    total = sum(s["seconds"] for s in steps)
    status = (f'<p style="color:#b00">Stopped: step <b>{html.escape(failed)}</b> failed; its '
              "executed copy holds the traceback.</p>" if failed else "")
    sub = run_dir / "submission.csv"
    links = [("submission.csv", "the submission")] if sub.exists() else []
    links += [(str(p.relative_to(run_dir)), "the exam figures, highest scores first (heatmaps, "
               "decisions, truth where known)") for p in sorted(run_dir.glob("**/exams/index.html"))]
    links += [(str(p.relative_to(run_dir)), f"evaluation on the {_evaluated_on(p.parent)}: "
               f"{p.stem.replace('_', ' ')}") for p in sorted(run_dir.glob("**/evaluation/*.png"))]
    sub_link = ("<h2>Files</h2><ul>" + "".join(
        f'<li><a href="{html.escape(h)}">{html.escape(h)}</a>: {html.escape(d)}</li>'
        for h, d in links) + "</ul>") if links else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(plan)}: run report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;vertical-align:top;
border-bottom:1px solid #ddd}}table{{border-collapse:collapse}}
img.fig{{max-width:1000px;height:auto;border:1px solid #eee}}td.num{{white-space:nowrap}}
td.how{{min-width:14em;max-width:24em;font-size:.85em}}td.what{{max-width:12em}}
table.scores td,table.scores th{{padding:4px 6px}}
p.headline{{font-size:1.1em;max-width:70em;line-height:1.4}}</style></head><body>
<h1>Run report: plan {html.escape(plan)}</h1>
<p>{len(steps)} step(s) in {total:.0f} s; folder {html.escape(str(run_dir.resolve()))}</p>
{status}
<h2>Scores</h2>
{score_html}
{sources_section(run_dir)}
{sub_link}
<h2>Steps</h2>
<table><tr><th>notebook</th><th>duration</th><th>key figure</th></tr>
{''.join(rows)}
</table></body></html>
"""
    out = run_dir / INDEX
    write_atomic(out, page)
    return out


