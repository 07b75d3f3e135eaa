"""`ensemble.json` and the one type that owns it: the members (checkpoints, with each one's
training recipe in an export), the cut inference applies (a threshold or the top quantile of
breasts, tuned on out-of-fold predictions), the views -> breast aggregation, the flip TTA those
predictions had, and the calibrator. `rsna oof` writes it (`oof.write_ensemble`), the Kaggle
export copies it (`kaggle.export_models`), `rsna predict --ensemble`, notebooks 04 and 05 and
the submit plan read it (`Ensemble.read`) and take their prediction settings from it
(`Ensemble.predict_settings`). The file's format is unchanged since 0.1: older files load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rsna_utils.core.errors import RsnaError, write_atomic

ENSEMBLE_FILE = "ensemble.json"
RUNTIME_KEYS = ("line", "submission_tta")      # said at run time, not stored


class Ensemble(dict):
    """The contents of ensemble.json (a dict of its keys, so it reads as the file does) with
    what inference decides from it. Keys: checkpoints, threshold, binarize ("threshold",
    "quantile:q" or None), agg, tta, calibrator, recipes, and the out-of-fold figures."""

    @classmethod
    def read(cls, path: str | Path, checkpoints: bool = True) -> "Ensemble":
        """The file (or DIR/ensemble.json). `checkpoints`: it must list them, resolved against
        its folder and present (an export); else it must hold a threshold (`rsna oof`'s file
        beside checkpoints given separately)."""
        # "{data}/../rsna-models": resolve ".." by the text, as a reader does (through a
        # symlinked mount the OS would go to the parent of the link's target)
        path = Path(os.path.normpath(os.path.abspath(path)))
        if path.is_dir():
            path = path / ENSEMBLE_FILE
        if not path.exists():
            raise RsnaError(f"{path}: no ensemble file; attach the models dataset written by the "
                            "training plan (its 04 step's export_dir, e.g. runs/kaggle/rsna-models)"
                            if checkpoints else f"{path}: no ensemble file; write it with `rsna oof`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RsnaError(f"{path}: not readable as JSON ({type(e).__name__}: {e}); "
                            + ("export it again with the training plan" if checkpoints
                               else "write it again with `rsna oof`")) from None
        if not isinstance(data, dict):
            raise RsnaError(f"{path}: holds a {type(data).__name__}, not an ensemble (a JSON "
                            "object); write it again with `rsna oof` or the training plan")
        ens = cls(data)
        ens.setdefault("agg", "mean")
        ens.setdefault("binarize", "threshold" if ens.get("threshold") is not None else None)
        ens.setdefault("threshold", None)
        if checkpoints:
            ens["checkpoints"] = [str(p) for p in ens._resolved(path)]
        else:
            try:
                float(ens["threshold"])
            except (TypeError, ValueError) as e:
                raise RsnaError(f"{path}: not an ensemble JSON with a threshold ({type(e).__name__}: "
                                f"{e}); write it with `rsna oof`") from None
        ens["line"] = (f"ensemble {path}: {len(ens.get('checkpoints') or [])} checkpoint(s), "
                       f"{ens['agg']} over views, " + ens.cut_line())
        return ens

    def _resolved(self, path: Path) -> list[Path]:
        names = self.get("checkpoints")
        if not names or not isinstance(names, list):
            raise RsnaError(f"{path}: lists no 'checkpoints'; it is not an exported ensemble "
                            "(write it with kaggle.export_models or the training plan's export_dir)")
        ckpts = [Path(p) if Path(p).is_absolute() else path.parent / p for p in map(str, names)]
        missing = [str(p) for p in ckpts if not p.exists()]
        if missing:
            raise RsnaError(f"{path}: checkpoint(s) {missing} missing; upload the whole exported "
                            "folder, not only ensemble.json")
        return ckpts

    def write(self, path: str | Path) -> None:
        """Atomically, as strict JSON (NaN/inf as null), without the run-time keys."""
        keep = {k: v for k, v in self.items() if k not in RUNTIME_KEYS}
        write_atomic(Path(path), json.dumps(finite(keep), indent=2, default=str) + "\n")

    # -- what it decides ----------------------------------------------------------------
    @property
    def tuned_tta(self) -> bool | None:
        """Whether the out-of-fold scores behind the threshold and calibrator averaged the
        horizontal flip: "tta"; a file with a threshold but no "tta" was written before runs
        could validate with the flip (so: no). None when nothing was tuned."""
        if self.get("tta") is not None:
            return bool(self["tta"])
        return False if self.get("threshold") is not None else None

    def cut_line(self) -> str:
        t = self.get("threshold")
        if self.get("binarize") and t is not None:
            rate = self.oof_rate
            return (f"binarised at {self['binarize']} (threshold {t:.4f}"
                    + (f"; out of fold it flagged {rate:.2%} of the breasts" if rate else "")
                    + ")")
        return "probabilities (no tuned threshold)"

    @property
    def oof_rate(self) -> float | None:
        """The out-of-fold positive rate: the share of breasts the tuned cut flagged on the
        out-of-fold scores ("quantile"), when the file has a threshold and a rate in (0, 1)."""
        q = self.get("quantile")
        try:
            q = float(q)
        except (TypeError, ValueError):
            return None
        return q if self.get("threshold") is not None and 0 < q < 1 else None

    def cuts(self, given: dict) -> bool:
        """Whether the output asked for (`given`: output, threshold) uses what was tuned on the
        out-of-fold scores: binary at its cut, or calibrated (a threshold given by hand is the
        user's own)."""
        output = given.get("output")
        return output == "calibrated" or (given.get("threshold") is None and (
            output == "binary" or (output is None and self.get("threshold") is not None)))

    def submission_tta(self, given: dict, source: str = "the ensemble") -> bool:
        """The flip TTA to predict with: `given["tta"]`, or when None the flip of the scores
        the cut was tuned on; one that differs from those is refused when the output cuts."""
        tuned = self.tuned_tta if self.get("threshold") is not None else self.get("tta")
        return submission_tta(tuned, given.get("tta"), cut=self.cuts(given), source=source)

    def predict_settings(self, given: dict | None = None, source: str | None = None,
                         follow_tta: bool = True) -> dict:
        """The `PredictConfig` fields this ensemble decides, given those set by hand (`given`:
        threshold, agg, output, binarize_how, tta): its threshold (unless given), its
        aggregation (another one is refused), binary output at its cut unless another output
        is asked for (at its threshold: with its out-of-fold rate, `oof_rate`, for the cut
        fallback of `cut.binary_cut`), its calibrator, and the flip TTA (`submission_tta`).
        `follow_tta` False (the CLI): the flip is decided only where the output cuts, else left
        to the flags."""
        given = given or {}
        source = source or str(self.get("line", "the ensemble")).partition(":")[0]
        agg = given.get("agg")
        if agg is not None and agg != self.get("agg", "mean"):
            raise RsnaError(f"{source}: its threshold was tuned on {self.get('agg')}-aggregated "
                            f"breasts but --agg is {agg}; drop --agg or rerun `rsna oof --agg {agg}`")
        output = given.get("output")
        out = {"threshold": given.get("threshold", self.get("threshold")),
               "agg": self.get("agg", "mean")}
        if self.get("recipe_weights"):
            out["member_weights"] = recipe_weights(self["recipe_weights"])
        if follow_tta or self.cuts(given):
            out["tta"] = self.submission_tta(given, source)
        if output in (None, "binary"):      # an ensemble alone: binary at its cut
            out["binarize_how"] = self.binarize_how(given.get("binarize_how"), source)
            # at its own threshold: the out-of-fold rate, for predict's cut fallback
            if (out["binarize_how"] == "threshold" and given.get("threshold") is None
                    and self.oof_rate is not None):
                out["oof_rate"] = self.oof_rate
        if output == "calibrated":
            out["calibrator"] = self.get("calibrator")
            if not out["calibrator"]:
                why = (self.get("calibration_error")
                       or ("not tuned on out-of-fold predictions: give the training runs"
                           if self.get("threshold") is None
                           else "written before calibrators or with --calibration none"))
                raise RsnaError(f"{source}: no calibrator ({why}); rerun `rsna oof --calibration "
                                "platt` on the training runs")
        elif self.get("calibrator") is not None:
            out["calibrator"] = self["calibrator"]
        return out

    def binarize_how(self, asked: str | None, source: str = "the ensemble") -> str | None:
        """The cut to binarise at: `asked` ("threshold", "quantile:q", or "quantile": flag the
        out-of-fold positive rate, the share of breasts the tuned cut called on the out-of-fold
        scores, as the 4th place did), else the one the file was tuned for."""
        if asked != "quantile":
            return asked or self.get("binarize")
        q = self.get("quantile")
        if q is None or not 0 < float(q) < 1:
            raise RsnaError(f"{source}: no out-of-fold positive rate (quantile {q!r}) to binarise "
                            "at; rerun `rsna oof` on the training runs, or give quantile:Q")
        return f"quantile:{float(q)!r}"

    def recipe_of(self, checkpoint: str | Path, folder: str | Path) -> str | None:
        """The recipe key this file recorded for `checkpoint` (exports), names resolved
        against `folder` as `read` resolves them."""
        names, recipes = self.get("checkpoints"), self.get("recipes")
        if not (isinstance(names, list) and isinstance(recipes, list)
                and len(names) == len(recipes)):
            return None
        here = os.path.normpath(os.path.abspath(checkpoint))
        for name, recipe in zip(names, recipes):
            there = os.path.normpath(os.path.abspath(Path(folder) / str(name)))
            if isinstance(recipe, str) and recipe and there == here:
                return recipe
        return None


def recipe_weights(weights: dict) -> dict:
    """ensemble.json's "recipe_weights" keyed as this version keys recipes (`canonical_recipe`:
    a 0.2 file's keys held whole paths); two keys that become one add their votes."""
    from rsna_utils.learn.checkpoint import canonical_recipe
    out: dict = {}
    for k, w in weights.items():
        k = canonical_recipe(k)
        out[k] = out[k] + w if k in out else w
    return out


def exported_recipe(checkpoint: Path) -> str | None:
    """The recipe an export's ensemble.json beside `checkpoint` recorded for it, if any (for
    `checkpoint.load_checkpoints(..., exported=exported_recipe)`)."""
    path = Path(checkpoint).parent / ENSEMBLE_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None        # Ensemble.read names a broken file; here the checkpoint decides
    return Ensemble(data).recipe_of(checkpoint, path.parent) if isinstance(data, dict) else None


def submission_tta(tuned: bool | None, asked: bool | None, cut: bool = True,
                   source: str = "the ensemble") -> bool:
    """The flip TTA of a submission: `asked`, or when None the flip of the scores its cut was
    tuned on (`tuned`, None: unknown, then no flip). With a `cut` (binary or calibrated output)
    an `asked` that differs from `tuned` is refused: the threshold would fall on scores of
    another distribution."""
    if asked is None:
        return bool(tuned)
    if cut and tuned is not None and bool(asked) != bool(tuned):
        how = "with" if tuned else "without"
        raise RsnaError(f"{source}: its threshold (and calibrator) were tuned on validation scores "
                        f"{how} the horizontal flip, but tta is {bool(asked)}; drop tta (--tta) so "
                        f"that it follows them, retrain the runs {'without' if tuned else 'with'} "
                        "--tta and rerun `rsna oof`, or output probabilities")
    return bool(asked)


def finite(d):
    """NaN/inf -> None, so the JSON is strict (AUC is NaN with one class)."""
    if isinstance(d, dict):
        return {k: finite(v) for k, v in d.items()}
    if isinstance(d, list):
        return [finite(v) for v in d]
    if isinstance(d, float) and not np.isfinite(d):
        return None
    return d


def unique_names(bases: list[str]) -> list[str]:
    """`bases` made unique within one export: a repeat gets a counter before its suffix
    (`best.pt`, `best_2.pt`; `lite0`, `lite0_2`)."""
    names, seen = [], set()
    for base in bases:
        name, k = base, 1
        while name in seen:
            k += 1
            name = f"{Path(base).stem}_{k}{Path(base).suffix}"
        seen.add(name)
        names.append(name)
    return names


def ensemble_checkpoints(path: str) -> list[str]:
    """The members of ensemble.json: an export's checkpoints (beside it), else the best.pt of
    each run `rsna oof` merged (its "runs", as given to it)."""
    if lists_checkpoints(path):
        return list(Ensemble.read(path, checkpoints=True)["checkpoints"])
    ens = Ensemble.read(path, checkpoints=False)
    runs = [r["run"] for r in ens.get("runs") or [] if isinstance(r, dict) and r.get("run")]
    if not runs:
        raise RsnaError(f"{path}: lists no checkpoints or runs; pass --checkpoints")
    ckpts = [Path(r) / "best.pt" for r in runs]
    missing = [str(c) for c in ckpts if not c.exists()]
    if missing:
        raise RsnaError(f"{path}: the best.pt of its run(s) {missing} not found (run folders as "
                        "given to `rsna oof`, from where it ran); run from there, or pass "
                        "--checkpoints")
    return [str(c) for c in ckpts]


def lists_checkpoints(path: str | Path) -> bool:
    """Whether ensemble.json (or DIR/ensemble.json) lists its checkpoints (an export) rather
    than the runs `rsna oof` merged; False for a file `Ensemble.read` would refuse."""
    path = Path(path)
    try:
        data = json.loads((path / ENSEMBLE_FILE if path.is_dir() else path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and bool(data.get("checkpoints"))


def read_ensemble(path: str | Path) -> Ensemble:
    """An export (checkpoints resolved beside it) or `rsna oof`'s file (a threshold needed)."""
    return Ensemble.read(path, checkpoints=lists_checkpoints(path))
