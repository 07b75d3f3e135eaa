"""Train anywhere, submit on Kaggle.

A Kaggle code competition re-runs the submission notebook offline on a hidden test set (about
8,000 patients, usually 4 images each, within 9 hours); nobody trains there. So the training
plan ends by exporting what inference needs into one folder (`export_models`: the checkpoints,
which carry their preprocessing settings and input contract, and `ensemble.json` with the
out-of-fold threshold), uploaded as a Kaggle dataset; the `submit` plan reads that folder
(`Ensemble.read`), predicts and says how long the hidden test will take
(`hidden_test_estimate`). The package itself reaches the offline notebook as a bundle of wheels
(`rsna_utils.app.bundle`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rsna_utils.core.errors import RsnaError, atomic_folder
from rsna_utils.infer.ensemble import ENSEMBLE_FILE, Ensemble, exported_recipe, unique_names

KAGGLE_INPUT = "/kaggle/input"        # attached datasets (read-only), unless $KAGGLE_INPUT
KAGGLE_WORKING = "/kaggle/working"    # the notebook's output, unless $KAGGLE_WORKING
KAGGLE_WEIGHTS = f"{KAGGLE_INPUT}/rsna-timm-weights"    # {weights} in a plan, unless --weights
# {external} in a plan, unless --external: public sources ingested by `rsna ingest`, one folder
# each (vindr/, cbis-ddsm/, cmmd/), attached as the Kaggle dataset rsna-external
KAGGLE_EXTERNAL = f"{KAGGLE_INPUT}/rsna-external"
HIDDEN_TEST_PATIENTS = 8000      # RSNA_DATA.md: the hidden test set, ~4 images per patient
KAGGLE_LIMIT_HOURS = 9.0         # a code competition's run-time limit


def kaggle_input() -> Path:
    """Where Kaggle mounts the attached datasets (read when asked, never at import)."""
    return Path(os.environ.get("KAGGLE_INPUT", KAGGLE_INPUT))


def kaggle_working() -> Path:
    return Path(os.environ.get("KAGGLE_WORKING", KAGGLE_WORKING))


def ensemble_for_submission(ensemble: str | Path | None = None, oof_runs=(), checkpoints=(),
                            out_json: str | Path | None = None, tta: bool | None = None,
                            output: str | None = None) -> Ensemble:
    """What the inference notebook submits, from one of three sources, in this order:
    an exported `ensemble` (Kaggle: checkpoints and threshold from the models dataset), the
    training runs `oof_runs` (their out-of-fold predictions tune the ensemble's threshold,
    written to `out_json`), or bare `checkpoints` (each carries its validation threshold).
    The `Ensemble` also holds "line" (what it is, in words) and "submission_tta": `tta` (flip
    averaging) None follows the scores the threshold was tuned on; another value than theirs
    is refused (`Ensemble.predict_settings`) when the output cuts or calibrates. "tta" stays
    what the out-of-fold scores had (exported)."""
    ens = _ensemble_for_submission(ensemble, oof_runs, checkpoints, out_json)
    ens["submission_tta"] = ens.submission_tta(
        {"tta": tta, "output": output}, source=str(ensemble or out_json or "the checkpoints"))
    ens["line"] += f"; flip TTA {'on' if ens['submission_tta'] else 'off'}"
    return ens


def submission_config(params, ens: Ensemble, decided: dict):
    """The `PredictConfig` the inference notebook predicts with: its parameters that are
    PredictConfig fields (`params`, its globals(): runtime and engines among them), the
    ensemble's checkpoints and what the ensemble decides (`decided`). With runtime "onnx" or
    "tensorrt" and no engines, an exported `ensemble`'s own folder, as `rsna predict
    --ensemble` takes it."""
    from rsna_utils.infer.predict import PredictConfig
    given = {}
    from rsna_utils.infer.engine import EXPORTED_RUNTIMES, engines_folder
    if params.get("runtime") in EXPORTED_RUNTIMES and not params.get("engines") \
            and params.get("ensemble"):
        given["engines"] = engines_folder(params["ensemble"])
    return PredictConfig.from_namespace(params, checkpoints=ens["checkpoints"],
                                        **{**decided, **given})


def _ensemble_for_submission(ensemble, oof_runs, checkpoints, out_json) -> Ensemble:
    if ensemble:
        return Ensemble.read(ensemble)
    checkpoints = [str(c) for c in checkpoints]
    if not checkpoints:
        raise RsnaError("no checkpoints: pass `ensemble` (an exported ensemble.json) or "
                        "`checkpoints` (best.pt files of the training runs)")
    if list(oof_runs):
        from rsna_utils.infer.oof import write_ensemble
        if out_json is None:
            raise RsnaError("oof_runs given without out_json: say where ensemble.json goes")
        ens = Ensemble(write_ensemble(list(oof_runs), out_json))
        ens["checkpoints"] = checkpoints
        ens.write(out_json)
        ens["line"] = (f"out-of-fold: {ens['n_breasts']} breasts ({ens['n_positives']} positive) "
                       f"from {len(ens['runs'])} runs, AUC {_fmt(ens.get('auc'))}, binarised "
                       f"pF1 {_fmt(ens.get('pf1'))}; " + ens.cut_line())
        return ens
    return Ensemble({"checkpoints": checkpoints, "threshold": None, "binarize": None, "agg": "mean",
                     "tta": _checkpoints_tta(checkpoints),
                     "line": f"{len(checkpoints)} checkpoint(s); no out-of-fold runs given, so a "
                             "threshold averages the checkpoints' validation thresholds"})


def _checkpoints_tta(checkpoints: list[str]) -> bool | None:
    """Whether the checkpoints' validation (and so their thresholds) averaged the flip (their
    TrainConfig.tta); None when they disagree or a file is unreadable here."""
    from rsna_utils.learn.weights import load_weights
    seen = set()
    for c in checkpoints:
        try:
            seen.add(bool((load_weights(c).get("config") or {}).get("tta", False)))
        except (RsnaError, OSError):
            return None        # predict names the unreadable file
    return seen.pop() if len(seen) == 1 else None


def export_models(ens: Ensemble | dict, out_dir: str | Path) -> dict:
    """Copy the ensemble's checkpoints and its ensemble.json (checkpoint names relative to it)
    into `out_dir`, the folder to upload as the Kaggle models dataset. Written into a temporary
    sibling first and renamed, so a half-copied folder never looks complete."""
    out_dir = Path(out_dir)
    ckpts = [Path(c) for c in ens.get("checkpoints", [])]
    if not ckpts:
        raise RsnaError("export_models: the ensemble has no checkpoints to export")
    missing = [str(c) for c in ckpts if not c.exists()]
    if missing:
        raise RsnaError(f"export_models: checkpoint(s) {missing} not found; train them first")
    if out_dir.exists() and not _is_export(out_dir):
        raise RsnaError(f"export_models: {out_dir} exists and is not an earlier export (only "
                        f"{ENSEMBLE_FILE}, .pt and their ONNX exports); give a new or empty "
                        "folder, e.g. "
                        f"{out_dir / 'rsna-models'}")
    names = _unique_names(ckpts)
    with atomic_folder(out_dir) as tmp:
        for src, name in zip(ckpts, names):
            shutil.copyfile(src, tmp / name)
        keep = Ensemble({k: v for k, v in ens.items() if k not in ("recipes", "oof_csv")})
        keep["checkpoints"] = names
        keep["source_checkpoints"] = [str(c) for c in ckpts]
        # the recipe (model) of each checkpoint, as its run folder said: predict averages the
        # folds of one recipe, then the recipes, as the out-of-fold merge did, without the runs
        recipes = [_recipe(c) for c in ckpts]
        if any(recipes):
            keep["recipes"] = recipes
        keep.write(tmp / ENSEMBLE_FILE)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return {"dir": str(out_dir), "files": [str(out_dir / n) for n in names + [ENSEMBLE_FILE]],
            "bytes": size,
            "line": f"exported {len(names)} checkpoint(s) + {ENSEMBLE_FILE} ({size / 1e6:.1f} MB) "
                    f"to {out_dir}: upload it as the Kaggle dataset 'rsna-models'"}


def hidden_test_estimate(result, patients: int = HIDDEN_TEST_PATIENTS,
                         limit_hours: float = KAGGLE_LIMIT_HOURS) -> dict:
    """How long the hidden test set would take at the images per second this run measured
    (`result`: a predict.PredictResult), with the test set's own images per patient."""
    imgs = result.images
    n = len(imgs)
    if n == 0 or result.seconds <= 0:
        raise RsnaError("hidden_test_estimate: the prediction run holds no timed images")
    per_patient = n / max(imgs["patient_id"].nunique(), 1)
    rate = n / result.seconds
    total = patients * per_patient
    hours = total / rate / 3600
    fits = hours <= limit_hours
    return {"images_per_second": rate, "images": total, "hours": hours, "fits": fits,
            "line": f"measured {rate:.1f} images/s on {n} images: the hidden test (~{patients} "
                    f"patients x {per_patient:.1f} images = {total:,.0f}) would take about "
                    f"{hours:.2f} h of the {limit_hours:g} h limit"
                    + ("" if fits else " -- TOO SLOW: fewer models or smaller inputs (or models validated "
                                       "without --tta, predicted without the flip)")
                    + " (this run's rate includes start-up; larger runs are faster per image)"}


def _recipe(ckpt: Path) -> str | None:
    """checkpoint.checkpoint_recipe of a training checkpoint; None for a file that is not one."""
    from rsna_utils.learn.checkpoint import checkpoint_recipe
    from rsna_utils.learn.weights import load_weights
    try:
        stored = load_weights(ckpt).get("config")
    except (RsnaError, OSError, AttributeError):
        return None
    return (checkpoint_recipe(ckpt, stored, exported_recipe) if isinstance(stored, dict)
            else None)


def _is_export(d: Path) -> bool:
    """An empty folder, or one holding only what export_models writes (and `rsna export
    --format onnx` adds in place: .onnx, .onnx.json): safe to replace."""
    files = list(d.iterdir()) if d.is_dir() and not d.is_symlink() else None
    return files is not None and all(
        f.is_file() and (f.name == ENSEMBLE_FILE or f.name.endswith((".pt", ".onnx", ".onnx.json")))
        for f in files)


def _unique_names(ckpts: list[Path]) -> list[str]:
    """run folder + file name (`resnet18_fold0_best.pt`), unique within the export."""
    return unique_names([f"{c.parent.name}_{c.name}" if c.parent.name else c.name
                         for c in ckpts])


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


