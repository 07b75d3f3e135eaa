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
    """Final scores found under the run: the best epoch of each training run (metrics.csv),
    the ensemble's out-of-fold result (ensemble.json), the submission's size."""
    run_dir = Path(run_dir)
    rows = []
    for m in sorted(run_dir.glob("*/metrics.csv")):
        try:
            df = pd.read_csv(m)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        key = "breast_mean_auc" if "breast_mean_auc" in df else None
        if key is None or df[key].isna().all():
            continue
        best = df.loc[df[key].idxmax()]
        rows.append({"what": f"training run {m.parent.name}", "epoch": int(best.get("epoch", -1)),
                     "breast AUC": best[key], "breast pF1": best.get("breast_mean_pf1"),
                     "breast PR-AUC": best.get("breast_mean_pr_auc")})
    for e in sorted(run_dir.glob("**/ensemble.json"))[:3]:
        try:
            d = json.loads(e.read_text())
        except (OSError, ValueError):
            continue
        if d.get("auc") is not None or d.get("pf1") is not None:
            rows.append({"what": f"out-of-fold ensemble ({e.relative_to(run_dir)})",
                         "breast AUC": d.get("auc"), "breast pF1": d.get("pf1"),
                         "breast PR-AUC": d.get("pr_auc"), "threshold": d.get("threshold")})
    sub = run_dir / "submission.csv"
    if sub.exists():
        s = pd.read_csv(sub)
        rows.append({"what": "submission.csv", "breasts": len(s),
                     "flagged": int((s["cancer"] >= 0.5).sum()) if "cancer" in s else None})
    return rows


def write_index(run_dir: str | Path, plan: str, steps: list[dict], failed: str | None = None,
                pending: list[str] = ()) -> Path:
    """steps: dicts with step, notebook, seconds (and html). Returns the index path."""
    run_dir = Path(run_dir)
    rows = []
    for s in steps:
        nb = Path(s["notebook"])
        link = Path(s.get("html") or nb).name
        fig = key_figure(nb) if nb.exists() else None
        img = (f'<img src="data:image/png;base64,{fig}" style="max-width:420px">' if fig else "")
        rows.append(f'<tr><td><a href="{html.escape(link)}">{html.escape(s["step"])}</a></td>'
                    f'<td>{s["seconds"]:.1f} s</td><td>{img}</td></tr>')
    for name in pending:
        rows.append(f"<tr><td>{html.escape(name)}</td><td>not run</td><td></td></tr>")
    scores = pd.DataFrame(run_scores(run_dir))
    score_html = (scores.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4f}")
                  if len(scores) else "<p>No scores yet.</p>")
    total = sum(s["seconds"] for s in steps)
    status = (f'<p style="color:#b00">Stopped: step <b>{html.escape(failed)}</b> failed; its '
              "executed copy holds the traceback.</p>" if failed else "")
    sub = run_dir / "submission.csv"
    sub_link = '<p><a href="submission.csv">submission.csv</a></p>' if sub.exists() else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(plan)}: run report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;vertical-align:top;
border-bottom:1px solid #ddd}}table{{border-collapse:collapse}}</style></head><body>
<h1>Run report: plan {html.escape(plan)}</h1>
<p>{len(steps)} step(s) in {total:.0f} s; folder {html.escape(str(run_dir.resolve()))}</p>
{status}
<h2>Scores</h2>
{score_html}
{sub_link}
<h2>Steps</h2>
<table><tr><th>notebook</th><th>duration</th><th>key figure</th></tr>
{''.join(rows)}
</table></body></html>
"""
    out = run_dir / INDEX
    write_atomic(out, page)
    return out


