"""Exam reports for a reader: per exam one figure (the views as a reader sees them, Grad-CAM
heat over them, view and breast scores, the decision at the threshold), an index.html sorted by
score and heatmaps.csv (one row per view, the heat's peak in original DICOM pixels).

`write_exam_reports` is what `rsna explain` and the notebooks call. Images are preprocessed in
this process with the checkpoint's stored settings (the CPU kernel, `preprocess_image`, which
also gives the crop box and flip the heat is mapped back through); one exam is one batch.
"""
from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rsna_utils.core.config import (AGGREGATIONS, Config, backend_setting, device_setting,
                                     progress_setting, setting)
from rsna_utils.core.errors import RsnaError, write_atomic
from rsna_utils.core.table import dicom_path
from rsna_utils.learn.checkpoint import TRAIN_FIX

VIEW_COLUMNS = ["image_id", "patient_id", "laterality", "view", "score", "peak_x", "peak_y"]
# attention: a breast-level model's weight of the view in its breast (empty for image models)
MORE_COLUMNS = ["prediction_id", "breast_score", "positive", "truth", "figure", "problem",
                "attention"]
VIEW_ORDER = {"CC": 0, "MLO": 1}          # reader's layout: CC row, MLO row, then other views
DISPLAY_MAX_SIDE = 800                    # the figure shows views at most this many pixels


@dataclass
class ViewResult:
    """One view: its display image and heat (at display scale) and the numbers."""
    row: dict
    display: np.ndarray | None = None     # windowed 8-bit, the full image, scaled to display
    heat: np.ndarray | None = None        # same grid as display, in [0, 1]
    scale: float = 1.0                    # display pixels per original pixel
    values: dict = field(default_factory=dict)


@dataclass
class ExplainConfig(Config):
    """The settings of `rsna explain` (its flags derive from these fields), and of
    `write_exam_reports`: their defaults are spelled here only."""

    KIND = "explain"

    images: str = setting(help="folder of {patient_id}/{image_id}.dcm")
    csv: str = setting(help="train.csv / test.csv (patient_id, image_id, laterality; view "
                       "optional)")
    out: str = setting(help="output folder (figures, index.html, heatmaps.csv)")
    checkpoints: list = setting([], "one or more best.pt (default with --ensemble: the ones it "
                                "lists)")
    ensemble: str | None = setting(None, "ensemble.json of `rsna oof` or an export (or its "
                                   "folder): its checkpoints, threshold, aggregation, flip and "
                                   "each model's vote, as `rsna predict --ensemble` submits")
    threshold: float | None = setting(None, "breast decision cut (default: the ensemble's, else "
                                      "the checkpoints' validation threshold)", ge=0, le=1)
    limit: int | None = setting(None, "only N exams: the highest scored (order score) or the "
                                "first of the CSV (order csv)", ge=1)
    order: str = setting("score", "which exams --limit keeps: the highest scores first (every "
                         "exam is scored, the heat computed for those kept), or the CSV's order",
                         choices=("score", "csv"))
    labels: str | None = setting(None, "a CSV with image_id and cancer (test_labels.csv, "
                                 "train.csv): the truth beside each decision")
    lesions: str | None = setting(None, "a CSV of lesion boxes in original pixels (image_id, "
                                  "kind, y0, x0, y1, x1; the synthetic lesions.csv): drawn on "
                                  "the views")
    by: str = setting("patient", "one figure per patient, or per patient and laterality",
                      choices=("patient", "breast"))
    agg: str | None = setting(None, "views -> breast score: mean or max (default: the "
                              "ensemble's, else mean)", choices=AGGREGATIONS)
    tta: bool | None = setting(None, "scores average the flip, as `rsna predict --tta` (default: "
                               "as the ensemble's threshold was tuned, else no flip)")
    device: str = device_setting()
    backend: str = backend_setting("CPU decoder: auto, imagecodecs, dicomsdl, pydicom")
    progress: bool = progress_setting()
    weights: dict | None = setting(None, "ensemble.json's recipe_weights: each model's vote "
                                   "(None: equal)", cli=False)

    def __post_init__(self):
        if isinstance(self.checkpoints, (str, Path)):
            self.checkpoints = [self.checkpoints]
        self.check_fields()
        self.checkpoints = [str(c) for c in self.checkpoints]

    def run(self, ensemble=None) -> dict:
        """`explain(self, ensemble)`: a `LoadedEnsemble` already on its device may be given."""
        return explain(self, ensemble)


def write_exam_reports(images: str | Path, csv: str | Path, checkpoints=None,
                       out: str | Path | None = None, *, ensemble=None, **settings) -> dict:
    """`explain` with the `ExplainConfig` of these arguments (its fields; `ensemble` may also be
    a `LoadedEnsemble`). Per exam (by="patient"; by="breast": per patient and laterality) one
    PNG figure in `out`, plus `out/index.html` (exams by decreasing score) and
    `out/heatmaps.csv`."""
    loaded = None if ensemble is None or isinstance(ensemble, (str, Path)) else ensemble
    if out is None:
        raise RsnaError("write_exam_reports: no output folder; pass out (e.g. runs/explain)")
    cfg = ExplainConfig(images=images, csv=csv, checkpoints=list(checkpoints or []), out=out,
                        ensemble=None if loaded is not None else ensemble, **settings)
    return explain(cfg, loaded)


def explain(cfg: ExplainConfig, ens=None) -> dict:
    """The exam reports of `cfg` (see `ExplainConfig`), with the ensemble `ens` (a
    `LoadedEnsemble`) or the one `cfg.ensemble` / `cfg.checkpoints` names.

    threshold: the breast decision's cut (default: the ensemble's out-of-fold threshold, else
    the checkpoints' stored validation thresholds averaged per recipe, as `rsna predict`);
    limit: N exams, the highest scored (order="score": every exam is scored first, without
    heat) or the first of the CSV (order="csv"). labels (image_id, cancer) put the truth beside
    each decision; lesions (image_id, kind, y0, x0, y1, x1 in original pixels) are drawn on
    the views. agg and tta: the submission's (an ensemble's `agg` and flip), so that the scores
    and the positive flags are the ones the threshold was tuned on.
    Returns {"index", "heatmaps_csv", "figures" (by decreasing score), "views" (DataFrame, one
    row per view), "exams" (DataFrame), "threshold", "seconds"}.
    """
    from tqdm.auto import tqdm

    from rsna_utils.reports.heatmap import explain_batch, pooled_votes
    t0 = time.perf_counter()
    df, images = _check_inputs(cfg, ens)
    ens = _ensemble(cfg) if ens is None else ens
    by, limit, order, backend, progress = cfg.by, cfg.limit, cfg.order, cfg.backend, cfg.progress
    labels, lesions, agg = cfg.labels, cfg.lesions, ens.agg
    out = Path(cfg.out)
    pre = ens.preprocess_config()
    threshold = ens.threshold
    out.mkdir(parents=True, exist_ok=True)
    key = "patient_id" if by == "patient" else "prediction_id"
    exams = list(dict.fromkeys(df[key]))
    if limit is not None and order == "score" and len(exams) > limit:
        exams = _by_score(df, key, images, ens, backend)
    if limit is not None:
        exams = exams[:limit]
    truth, boxes = _truth(labels, df), _boxes(lesions)
    rows, figures = [], {}
    bar = tqdm(total=len(exams), desc="explain", unit="exam", disable=not progress, file=sys.stderr)
    for exam in exams:
        views = [_load_view(r, images, pre, backend) for r in
                 df[df[key] == exam].to_dict("records")]
        ok = [v for v in views if not v.values.get("problem")]
        if ok:
            canvases = [v.values.pop("canvas") for v in ok]
            scores, heat = explain_batch(canvases, ens)
            # breast-level members: the exam's views of each breast pooled, as `rsna predict`
            votes, attention = pooled_votes(canvases, [v.row["prediction_id"] for v in ok], ens)
            for v, s, h, a in zip(ok, scores + votes, heat, attention):
                _finish_view(v, float(s), h)
                if a == a:
                    v.values["attention"] = float(a)
        _breast_scores(views, agg, threshold)
        for v in views:
            v.values["truth"] = truth.get(v.row["prediction_id"])
            v.values["lesions"] = boxes.get(int(v.row["image_id"]), [])
        name = f"{exam}.png"
        _write_figure(out / name, exam, by, views, threshold)
        figures[exam] = name
        for v in views:
            rows.append(dict(v.row, **{k: v.values.get(k) for k in ("score", "peak_x", "peak_y",
                                                                    "breast_score", "positive",
                                                                    "truth", "attention")},
                             figure=name, problem=v.values.get("problem", "")))
        bar.update()
    bar.close()
    table = pd.DataFrame(rows, columns=VIEW_COLUMNS + MORE_COLUMNS)
    table[["peak_x", "peak_y"]] = table[["peak_x", "peak_y"]].astype("Int64")   # empty: no peak
    summary = _exam_table(table, key, figures)
    csv_path, index = out / "heatmaps.csv", out / "index.html"
    write_atomic(csv_path, table.to_csv(index=False))
    write_atomic(index, _index_html(summary, key, threshold, [m.path for m in ens.models], agg))
    return dict(index=str(index), heatmaps_csv=str(csv_path),
                figures=[str(out / f) for f in summary["figure"]], views=table, exams=summary,
                threshold=threshold, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# Inputs and one view
# ----------------------------------------------------------------------------------------

def _check_inputs(cfg: ExplainConfig, ens) -> tuple[pd.DataFrame, Path]:
    """One clear line per bad input, before any model is loaded (the config checked its
    choices and ranges when it was made)."""
    from rsna_utils.learn.png_table import load_table
    from rsna_utils.dicom.reader import check_dicom_folder
    images = check_dicom_folder(cfg.images)
    given = [k for k in ("threshold", "agg", "tta") if getattr(cfg, k) is not None]
    if ens is not None and given:
        raise RsnaError(f"{', '.join(given)} given with a loaded ensemble, which brings its own; "
                        "load it with them (LoadedEnsemble.from_json(path, device, "
                        f"{given[0]}=...)) or pass its path as ensemble")
    if ens is None and not cfg.checkpoints and not cfg.ensemble:
        raise RsnaError("no checkpoint given; pass --checkpoints runs/<name>/best.pt or "
                        "--ensemble ensemble.json")
    for c in cfg.checkpoints:
        if not Path(c).is_file():
            raise RsnaError(f"{c}: checkpoint not found; {TRAIN_FIX}")
    csv = cfg.csv
    df = load_table(csv)          # names the CSV and the missing column(s)
    if df.empty:
        raise RsnaError(f"{csv}: no images listed (only a header?); pass train.csv or test.csv")
    if "view" not in df:
        df["view"] = ""           # filled from the header's ViewPosition
    return df, images


def _ensemble(cfg: ExplainConfig):
    """The `LoadedEnsemble` of `cfg`: its ensemble.json with the settings it decides (a
    threshold or aggregation given by hand where it allows them), else its checkpoints."""
    from rsna_utils.infer.scoring import LoadedEnsemble
    from rsna_utils.learn.device import resolve_device
    dev = resolve_device(cfg.device)
    if cfg.ensemble:
        given = {k: v for k, v in (("threshold", cfg.threshold), ("agg", cfg.agg),
                                   ("tta", cfg.tta)) if v is not None}
        return LoadedEnsemble.from_json(cfg.ensemble, dev, checkpoints=cfg.checkpoints or None,
                                        **given)
    return LoadedEnsemble.from_checkpoints(cfg.checkpoints, dev, cfg.weights, tta=bool(cfg.tta),
                                          agg=cfg.agg or "mean", threshold_given=cfg.threshold)


def _by_score(df: pd.DataFrame, key: str, images: Path, ens, backend: str) -> list:
    """Every exam scored as `rsna predict` scores it (no heat), highest first, unreadable last."""
    from rsna_utils.learn.metrics import breast_level
    preds, _, _, _ = ens.score_images(df, images, 16, 0, backend, False)
    breast = breast_level(df.assign(prediction=preds), "prediction", None, ens.agg)
    exam_of = dict(zip(df["prediction_id"], df[key]))
    score = breast.assign(exam=breast["prediction_id"].map(exam_of)).groupby(
        "exam", sort=False)["prediction"].max()
    return list(score.sort_values(ascending=False, na_position="last", kind="stable").index)


def _table(path, what: str, need: list[str], example: str) -> pd.DataFrame:
    """A CSV with the columns `need`, or one line naming the file, what is wrong and what to pass."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RsnaError(f"{path}: {what} not readable ({type(e).__name__}); pass a CSV with "
                        f"{', '.join(need)} ({example})") from None
    if not set(need) <= set(df.columns):
        raise RsnaError(f"{path}: needs the columns {' and '.join(need) if len(need) == 2 else need}"
                        f" (has {list(df.columns)[:8]}); pass {example}")
    return df


def _truth(labels, df: pd.DataFrame) -> dict:
    """prediction_id -> 1 / 0 from a CSV with image_id and cancer (a breast is positive when
    any of its images is)."""
    if labels is None:
        return {}
    lab = _table(labels, "labels", ["image_id", "cancer"], "test_labels.csv or train.csv")
    m = df[["image_id", "prediction_id"]].merge(lab[["image_id", "cancer"]], on="image_id")
    return {k: int(v) for k, v in m.groupby("prediction_id")["cancer"].max().items()}


def _boxes(lesions) -> dict:
    """image_id -> [(kind, y0, x0, y1, x1)] in original pixels."""
    if lesions is None:
        return {}
    les = _table(lesions, "lesion boxes", ["image_id", "y0", "x0", "y1", "x1"],
                 "the synthetic lesions.csv; kind optional")
    if "kind" not in les:
        les["kind"] = "lesion"
    out: dict = {}
    for r in les.itertuples():
        out.setdefault(int(r.image_id), []).append((str(r.kind), r.y0, r.x0, r.y1, r.x1))
    return out


def _load_view(row: dict, images: Path, cfg, backend: str) -> ViewResult:
    """Decode once: the display image (the file's VOI LUT over the whole image) and the
    preprocessed canvas with its geometry. Failures become the view's `problem`."""
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image import roi
    from rsna_utils.image.convert import preprocess_image
    from rsna_utils.image.voi import apply_voi_lut
    from rsna_utils.reports.heatmap import ViewGeometry
    row = {k: row[k] for k in ("image_id", "patient_id", "laterality", "view", "prediction_id")}
    v = ViewResult(row)
    path = dicom_path(images, row["patient_id"], row["image_id"])
    try:
        if not path.exists():
            raise RsnaError(f"{path}: file not found (listed in the CSV)")
        h = read_header(path)
        pixels, used = decode_pixels(h, backend, cfg.max_pixels)
        canvas, meta = preprocess_image(path, cfg, used, pixels=pixels, header=h)
        shown, _ = apply_voi_lut(pixels, h, cfg.window_index, 8, cfg.prefer_lut)
    except RsnaError as e:
        v.values["problem"] = str(e)
        return v
    except Exception as e:   # a decoder bug on a strange file costs this view only
        v.values["problem"] = f"{path}: unhandled exception {type(e).__name__}: {e}"
        return v
    if not str(row["view"]).strip() or str(row["view"]) == "nan":
        row["view"] = h.view or ""
    v.scale = min(1.0, DISPLAY_MAX_SIDE / max(shown.shape))
    v.display = roi.resize_to(shown, (max(1, round(shown.shape[0] * v.scale)),
                                      max(1, round(shown.shape[1] * v.scale))))
    v.values.update(canvas=canvas, geometry=ViewGeometry.from_meta(meta, cfg))
    return v


def _finish_view(v: ViewResult, score: float, canvas_heat: np.ndarray) -> None:
    from rsna_utils.reports.heatmap import canvas_peak
    g = v.values.pop("geometry")
    v.values["score"] = score
    if canvas_heat[:g.content[0], :g.content[1]].max() > 0:   # all 0: nothing raised the logit
        v.values["peak_x"], v.values["peak_y"] = g.canvas_to_original_pixel(*canvas_peak(canvas_heat, g))
    v.heat = g.canvas_to_original_image(canvas_heat, v.scale)[:v.display.shape[0], :v.display.shape[1]]


def _breast_scores(views: list[ViewResult], agg: str, threshold: float) -> None:
    """Each view gets its breast's score (mean or max of its readable views) and decision."""
    from rsna_utils.learn.metrics import breast_level
    scores = pd.DataFrame({"prediction_id": [v.row["laterality"] for v in views],
                           "prediction": [v.values.get("score", np.nan) for v in views]})
    breast = breast_level(scores, "prediction", None, agg).set_index("prediction_id")["prediction"]
    for v in views:
        b = float(breast[v.row["laterality"]])
        v.values.update(breast_score=b, positive=bool(b == b) and b >= threshold)


def _exam_table(views: pd.DataFrame, key: str, figures: dict) -> pd.DataFrame:
    """One row per exam, by decreasing score (the highest breast score; unreadable last)."""
    rows = []
    for exam, d in views.groupby(key, sort=False):
        breasts = d.drop_duplicates("laterality").set_index("laterality")
        rows.append(dict(exam=exam, score=d["breast_score"].max(),
                         positive=bool(d["positive"].fillna(False).astype(bool).any()),
                         breasts={k: r.breast_score for k, r in breasts.iterrows()},
                         views=len(d), unreadable=int(d["problem"].fillna("").astype(bool).sum()),
                         truth=None if d["truth"].isna().all() else int(d["truth"].max()),
                         figure=figures[exam]))
    t = pd.DataFrame(rows, columns=["exam", "score", "positive", "breasts", "views", "unreadable",
                                    "truth", "figure"])
    return t.sort_values("score", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------

def overlay(display: np.ndarray, heat: np.ndarray | None, strength: float = 0.6) -> np.ndarray:
    """Gray 8-bit image + heat in [0, 1] -> RGB uint8 (jet colours, opacity rising with heat)."""
    gray = np.repeat(display[..., None], 3, axis=2).astype(np.float32) / 255
    if heat is None:
        return (gray * 255).astype(np.uint8)
    h = np.clip(heat, 0, 1).astype(np.float32)
    color = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1] / 255.0
    a = (strength * h)[..., None]
    return np.clip((gray * (1 - a) + color * a) * 255, 0, 255).astype(np.uint8)


def _panel_order(views: list[ViewResult], by: str) -> list[list[ViewResult | None]]:
    """Rows of panels: CC, then MLO, then other views; right breast left, left breast right
    (as on a reading screen)."""
    lats = ["R", "L"] if by == "patient" else sorted({v.row["laterality"] for v in views})
    names = sorted({str(v.row["view"]) for v in views}, key=lambda n: (VIEW_ORDER.get(n, 2), n))
    grid = []
    for name in names:
        cells = [[v for v in views if str(v.row["view"]) == name and v.row["laterality"] == lat]
                 for lat in lats]
        cells += [[v for v in views if str(v.row["view"]) == name and v.row["laterality"] not in lats]]
        for k in range(max(len(c) for c in cells)):
            grid.append([c[k] if k < len(c) else None for c in cells])
    if grid and all(r[-1] is None for r in grid):
        grid = [r[:-1] for r in grid]
    return grid


def _write_figure(path: Path, exam, by: str, views: list[ViewResult], threshold: float) -> None:
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    grid = _panel_order(views, by)
    ncols = max(1, max((len(r) for r in grid), default=1))
    nrows = max(1, len(grid))
    fig = Figure(figsize=(3.6 * ncols, 4.4 * nrows + 0.6), dpi=110, layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    top = max([float(v.heat.max()) for v in views if v.heat is not None] + [0.0]) or 1.0
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            v = grid[r][c] if r < len(grid) and c < len(grid[r]) else None
            if v is None:
                continue
            lab = f"{v.row['laterality']} {v.row['view']}".strip()
            if v.display is None:
                ax.text(0.5, 0.5, "unreadable:\n" + _wrap(v.values.get("problem", "")), ha="center",
                        va="center", fontsize=6, wrap=True, transform=ax.transAxes)
                ax.set_title(f"{lab}  (no score)", fontsize=9)
                continue
            ax.imshow(overlay(v.display, None if v.heat is None else v.heat / top))
            for kind, y0, x0, y1, x1 in v.values.get("lesions", []):
                bad = kind not in ("benign", "calcification_benign")
                ax.add_patch(Rectangle((x0 * v.scale, y0 * v.scale), (x1 - x0) * v.scale,
                                       (y1 - y0) * v.scale, fill=False, lw=1.4,
                                       ls="-" if bad else "--",
                                       ec="#ff3030" if bad else "#ffd000"))
            if "peak_x" in v.values:
                ax.plot([(v.values["peak_x"] + 0.5) * v.scale], [(v.values["peak_y"] + 0.5) * v.scale],
                        marker="+", color="white", markersize=14, mew=2)
            att = (f"  attention {v.values['attention']:.2f}" if "attention" in v.values else "")
            ax.set_title(f"{lab}  score {v.values.get('score', float('nan')):.3f}{att}", fontsize=9)
    breasts = {v.row["laterality"]: (v.values.get("breast_score"), v.values.get("positive"),
                                     v.values.get("truth")) for v in views}
    said = {None: "", 1: " (truth: cancer)", 0: " (truth: no cancer)"}
    parts = [(f"{lat}: {s:.3f} {'POSITIVE' if p else 'negative'}" if s == s and s is not None
              else f"{lat}: unreadable") + said.get(y, "")
             for lat, (s, p, y) in sorted(breasts.items(), reverse=True)]
    fig.suptitle(f"{'patient' if by == 'patient' else 'breast'} {exam}   (threshold "
                 f"{threshold:.3f})\n" + "   ".join(parts), fontsize=10)
    boxed = any(v.values.get("lesions") for v in views)
    note = ("heat: HiResCAM (stride 16) weighted by the view's score, scaled to the exam's "
            "maximum; + marks the peak" + ("; boxes: the lesions (red: malignant, yellow "
                                           "dashed: benign)" if boxed else "")
            + ("; attention: the breast-level model's weight of the view in its breast" if
               any("attention" in v.values for v in views) else ""))
    fig.supxlabel("\n".join(textwrap.wrap(note, 34 * ncols)), fontsize=7)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _wrap(text: str, width: int = 48) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)[:6])


def _index_html(exams: pd.DataFrame, key: str, threshold: float, checkpoints: list[str],
                agg: str = "mean") -> str:
    e = html.escape
    rows = []
    for i, r in exams.iterrows():
        breasts = ", ".join(f"{k} {v:.3f}" if v == v else f"{k} unreadable"
                            for k, v in sorted(r.breasts.items(), reverse=True))
        decision = "POSITIVE" if r.positive else "negative"
        if r.truth is not None and r.truth == r.truth:
            decision += " (truth: cancer)" if r.truth else " (truth: no cancer)"
        score = "unreadable" if r.score != r.score else f"{r.score:.3f}"
        rows.append(f'<tr class="{decision.lower()}"><td>{i + 1}</td><td>{e(str(r.exam))}</td>'
                    f"<td>{score}</td><td>{decision}</td><td>{e(breasts)}</td><td>{r.views}"
                    f"{f' ({r.unreadable} unreadable)' if r.unreadable else ''}</td>"
                    f'<td><a href="{e(r.figure)}"><img src="{e(r.figure)}" width="260" '
                    f'loading="lazy" alt="{e(str(r.exam))}"></a></td></tr>')
    head = ("<th>#</th><th>" + ("patient" if key == "patient_id" else "breast") +
            "</th><th>score</th><th>decision</th><th>breasts</th><th>views</th><th>figure</th>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Exam reports</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}} tr.positive td:nth-child(4){{color:#b00;font-weight:bold}}</style>
</head><body>
<h1>Exam reports</h1>
<p>{len(exams)} exams by decreasing score (the highest breast score: the {agg} of its views'
probabilities). Click a figure to open it full size. Decision at threshold {threshold:.4f}. Checkpoints: {e(", ".join(checkpoints))}.
Heat: HiResCAM (gradient x activation) of the stride-16 feature map, mapped back to the original pixels.</p>
<table><tr>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""



