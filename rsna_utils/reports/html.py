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


def key_figure(ipynb: str | Path) -> str | None:
    """The last PNG a notebook shows (base64), the summary figure of most steps."""
    import nbformat
    nb = nbformat.read(Path(ipynb), as_version=4)
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return pngs[-1].replace("\n", "") if pngs else None


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
                     "breast pF1": ens.get("pf1"), "threshold": ens.get("threshold")})
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
                     "breast pF1": best.get("breast_mean_pf1")})
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
                "these same breasts, so this pF1 is optimistic")
    return f"{n_runs} runs, each breast scored by the model that did not train on it"


def _vote(ens: dict, run_dir: Path) -> float | None:
    """A training run's model's share of the ensemble's vote (ensemble.json's runs and weights)."""
    weights = ens.get("weights") or {}
    for r in ens.get("runs", []):
        if isinstance(r, dict) and Path(str(r.get("run", ""))).name == run_dir.name:
            w = weights.get(str(r.get("model")))
            return float(w) if w is not None else None
    return None


def _held_out(images_csv: Path, submission: Path) -> dict | None:
    """The held-out test score: breast AUC and PR-AUC of the probabilities, pF1 of the submitted
    values, when the prediction run had labels (`predict --labels`)."""
    from rsna_utils.learn import metrics
    try:
        im = pd.read_csv(images_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if "cancer" not in im or im["cancer"].isna().all():
        return None
    b = metrics.breast_level(im.dropna(subset=["cancer"]), "prediction", "cancer")
    row = {"what": "held-out test patients",
           "how": "never trained or tuned on: the score that matters",
           "breasts": len(b), "positive": int(b["cancer"].sum()),
           "breast AUC": metrics.roc_auc(b["cancer"], b["prediction"].fillna(0)),
           "breast PR-AUC": metrics.pr_auc(b["cancer"], b["prediction"].fillna(0))}
    try:
        s = pd.read_csv(submission).merge(b[["prediction_id", "cancer"]], on="prediction_id",
                                          suffixes=("", "_true"))
        row["breast pF1"] = metrics.pfbeta(s["cancer_true"], s["cancer"])
        row["flagged"] = int((s["cancer"] >= 0.5).sum())
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        pass
    return row


SCORE_COLUMNS = ("what", "how", "breasts", "positive", "flagged", "breast AUC", "breast PR-AUC",
                 "breast pF1", "threshold")


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
    """The scores as an HTML table: counts as integers, scores to 3 decimals, empty cells
    blank; "flagged" explained under it."""
    if not rows:
        return "<p>No scores yet.</p>"
    cols = [c for c in SCORE_COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(c, v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if c in ("breasts", "positive", "flagged"):
            return f"{int(v):,}"
        return f"{v:.3f}" if isinstance(v, (float, int)) and not isinstance(v, bool) else str(v)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c, r.get(c)))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    note = ("<p><small>flagged: breasts the submission calls back (value 1, or a probability of "
            "0.5 or more). pF1: the competition's probabilistic F1 at breast level.</small></p>")
    return f"<table><tr>{head}</tr>{body}</table>{note}"


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
                   f'<img src="data:image/png;base64,{fig}" style="max-width:420px"></a>')
        rows.append(f'<tr><td><a href="{html.escape(link)}">{html.escape(s["step"])}</a></td>'
                    f'<td>{s["seconds"]:.1f} s</td><td>{img}</td></tr>')
    for name in pending:
        rows.append(f"<tr><td>{html.escape(name)}</td><td>not run</td><td></td></tr>")
    score_html = scores_table(run_scores(run_dir))
    total = sum(s["seconds"] for s in steps)
    status = (f'<p style="color:#b00">Stopped: step <b>{html.escape(failed)}</b> failed; its '
              "executed copy holds the traceback.</p>" if failed else "")
    sub = run_dir / "submission.csv"
    links = [("submission.csv", "the submission")] if sub.exists() else []
    links += [(str(p.relative_to(run_dir)), "the exam figures, highest scores first (heatmaps, "
               "decisions, truth where known)") for p in sorted(run_dir.glob("**/exams/index.html"))]
    links += [(str(p.relative_to(run_dir)), f"evaluation: {p.stem.replace('_', ' ')}")
              for p in sorted(run_dir.glob("**/evaluation/*.png"))]
    sub_link = ("<h2>Files</h2><ul>" + "".join(
        f'<li><a href="{html.escape(h)}">{html.escape(h)}</a>: {html.escape(d)}</li>'
        for h, d in links) + "</ul>") if links else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(plan)}: run report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;vertical-align:top;
border-bottom:1px solid #ddd}}table{{border-collapse:collapse}}</style></head><body>
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


