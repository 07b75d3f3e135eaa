"""Run the notebook suite headless with papermill, following a plan (YAML):

    name: demo
    steps:
      - notebook: 03_train.ipynb
        name: 03_train_resnet18          # the executed copy's name (default: the notebook's)
        parameters: {model: resnet18, size: 64, out_dir: "{run_dir}/resnet18"}

"{run_dir}", "{data}" and "{repo}" in string parameters are replaced. Executed notebooks go to
runs/<name>/; the run stops at the first failing notebook and names it with its error.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from rsna_utils.errors import RsnaError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def load_plan(plan: str | Path) -> dict:
    import yaml
    p = Path(plan)
    if not p.exists() and not p.suffix:
        p = NOTEBOOKS / "plans" / f"{plan}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in (NOTEBOOKS / "plans").glob("*.yaml"))
        raise RsnaError(f"plan {plan!r} not found; give a YAML path or one of {known}")
    d = yaml.safe_load(p.read_text()) or {}
    if not isinstance(d.get("steps"), list) or not d["steps"]:
        raise RsnaError(f"{p}: a plan needs a non-empty 'steps' list")
    d.setdefault("name", p.stem)
    return d


def _parse_value(text: str):
    import yaml
    return yaml.safe_load(text)


def _substitute(value, ctx: dict):
    if isinstance(value, str):
        for k, v in ctx.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, list):
        return [_substitute(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, ctx) for k, v in value.items()}
    return value


def run_plan(plan: str | Path, data: str | Path = "data/synthetic", runs: str | Path = "runs",
             name: str | None = None, overrides: list[str] | None = None,
             only: list[str] | None = None, progress: bool = True) -> dict:
    """Execute every step; returns {"run_dir", "notebooks": [...], "submission"}.

    overrides: "key=value" strings applied to every step whose notebook has that parameter
    (e.g. ["epochs=1"]), or "step_name.key=value" for one step."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    d = load_plan(plan)
    run_dir = Path(runs) / (name or d["name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = {"run_dir": run_dir.resolve(), "data": Path(data).resolve(), "repo": REPO}
    over: dict[str, dict] = {}
    for o in overrides or []:
        if "=" not in o:
            raise RsnaError(f"override {o!r}: write key=value or step.key=value")
        k, v = o.split("=", 1)
        step, _, key = k.rpartition(".")
        over.setdefault(step, {})[key] = _parse_value(v)
    done = []
    for i, step in enumerate(d["steps"]):
        nb = NOTEBOOKS / step["notebook"]
        if not nb.exists():
            raise RsnaError(f"plan step {i}: notebook {nb} not found")
        step_name = step.get("name", nb.stem)
        if only and step_name not in only:
            continue
        declared = set(pm.inspect_notebook(str(nb)))
        params = _substitute(dict(step.get("parameters", {})), ctx)
        for scope in ("", step_name):
            for k, v in over.get(scope, {}).items():
                if k in declared:
                    params[k] = _substitute(v, ctx)
        unknown = set(params) - declared
        if unknown:
            raise RsnaError(f"plan step {step_name}: {nb.name} has no parameter(s) {sorted(unknown)}; "
                            f"its parameters: {sorted(declared)}")
        out = run_dir / f"{step_name}.ipynb"
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(d['steps'])}] {nb.name} -> {out}", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3",
                                progress_bar=progress, cwd=str(REPO), log_output=False)
        except PapermillExecutionError as e:
            raise RsnaError(f"notebook {step_name} failed in cell {e.exec_count}: {e.ename}: "
                            f"{e.evalue} (executed copy with the traceback: {out})") from None
        done.append(dict(step=step_name, notebook=str(out), seconds=round(time.perf_counter() - t0, 1)))
    sub = run_dir / "submission.csv"
    kaggle = Path(os.environ.get("KAGGLE_WORKING", "/kaggle/working"))
    if sub.exists() and Path(runs).resolve() == kaggle.resolve():
        # Kaggle scores /kaggle/working/submission.csv, not the plan's sub-folder
        shutil.copyfile(sub, kaggle / "submission.csv")
        sub = kaggle / "submission.csv"
    return {"run_dir": str(run_dir), "notebooks": done,
            "submission": str(sub) if sub.exists() else None}
