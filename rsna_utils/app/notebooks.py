"""Run the notebook suite headless with papermill, following a plan (YAML):

    name: demo
    steps:
      - notebook: 03_train.ipynb
        name: 03_train_resnet18          # the executed copy's name (default: the notebook's)
        parameters: {model: resnet18, size: 64, out_dir: "{run_dir}/resnet18"}

"{run_dir}", "{data}", "{train}" and "{repo}" in string parameters are replaced. Executed
notebooks go to runs/<name>/, each also as HTML, with an index.html report of the run (steps,
durations, key figures, scores); the run stops at the first failing notebook and names it with
its error.

A plan may list `sources:` to train on a mix (`sources.mix.check_plan_sources`):

    sources:
      - {name: rsna, dir: "{data}"}                   # a folder with train.csv, train_images/
      - {name: cbis-ddsm, images: data/cbis/train_images, csv: data/cbis/train.csv, weight: 0.5}

Before the first step they are combined (`ingest.combine`) into {run_dir}/sources, which
"{train}" then stands for ("{data}" in a plan without sources: steps that read
"{train}/train.csv" and "{train}/train_images" run either way), and every training step gets
their weights as `source_weights` (in its `extra` unless the step sets them).

The notebooks come from the checkout (`notebooks/`); with rsna_utils installed from a wheel
(the Kaggle bundle), from $RSNA_NOTEBOOKS or the bundle found under $KAGGLE_INPUT
(/kaggle/input/*/rsna_bundle.json).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.kaggle import (
    KAGGLE_EXTERNAL,
    KAGGLE_INPUT,
    KAGGLE_WEIGHTS,
    kaggle_input,
    kaggle_working,
)

REPO = Path(__file__).resolve().parents[2]
MIX_DIR = "sources"        # {run_dir}/sources: a plan's sources combined, "{train}"


def find_notebooks() -> Path:
    """The notebook suite: $RSNA_NOTEBOOKS, the checkout's notebooks/, or an attached bundle's."""
    env = os.environ.get("RSNA_NOTEBOOKS")
    if env:
        return Path(env)
    if (REPO / "notebooks" / "plans").is_dir():
        return REPO / "notebooks"
    inputs = kaggle_input()
    found = sorted(inputs.glob("*/rsna_bundle.json")) if inputs.is_dir() else []
    if found:
        return found[0].parent / "notebooks"
    return REPO / "notebooks"     # absent: load_plan names it




def load_plan(plan: str | Path) -> dict:
    import yaml
    suite = find_notebooks()
    p = Path(plan)
    if not p.exists() and not p.suffix:
        p = suite / "plans" / f"{plan}.yaml"
    if not p.exists():
        if not (suite / "plans").is_dir():
            raise RsnaError(f"plan {plan!r}: no notebook suite at {suite}; run from a checkout, "
                            "attach the rsna-bundle dataset, or set RSNA_NOTEBOOKS=<folder>")
        known = sorted(x.stem for x in (suite / "plans").glob("*.yaml"))
        raise RsnaError(f"plan {plan!r} not found; give a YAML path or one of {known}")
    d = yaml.safe_load(p.read_text()) or {}
    if not isinstance(d.get("steps"), list) or not d["steps"]:
        raise RsnaError(f"{p}: a plan needs a non-empty 'steps' list")
    d.setdefault("name", p.stem)
    if "sources" in d:
        from rsna_utils.sources.mix import check_plan_sources
        d["sources"] = check_plan_sources(d["sources"], str(p))
    return d


def _parse_value(text: str):
    """YAML for a -p value (numbers, lists, booleans); text that is not YAML, such as
    "{weights}/resnet18" (a flow mapping to YAML), stays the string it was written as."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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


def plan_steps(plan: str | Path, data: str | Path = "data/synthetic", runs: str | Path = "runs",
               name: str | None = None, overrides: list[str] | None = None,
               only: list[str] | None = None, weights: str | Path = KAGGLE_WEIGHTS,
               variant: str | None = None, external: str | Path = KAGGLE_EXTERNAL,
               require_sources: bool = False, say=None, skip_missing: bool = True):
    """The plan read and resolved: (plan dict, run folder, [(index, step name, notebook,
    parameters)], every step's name); placeholders filled, the variant's then the caller's
    overrides applied, parameters checked against each notebook's. Nothing is run (`run_plan`
    runs them, `estimate` times them).

    variant: a named set of overrides in the plan's `variants:` (e.g. the kaggle plan's 12h).
    external: the folder "{external}" stands for (ingested public sources, one sub-folder each);
    an optional source whose folder is missing is skipped with one line (`require_sources`:
    stopped; `skip_missing=False`: kept, for an estimate made before the data is at hand).
    Overrides may name steps by a pattern: "03_train_convnext_*.epochs=6"."""
    import fnmatch

    import papermill as pm
    d = load_plan(plan)
    run_dir = Path(runs) / (name or d["name"])
    # absolute, not resolved: a symlinked mount keeps its siblings ("{data}/../rsna-models")
    ctx = {"run_dir": run_dir.resolve(), "data": Path(data).absolute(), "repo": REPO,
           "weights": Path(weights).absolute(), "external": Path(external).absolute()}
    if variant is not None:
        known = d.get("variants") or {}
        if variant not in known:
            raise RsnaError(f"plan {d['name']}: no variant {variant!r}; its variants: "
                            f"{sorted(known) or 'none'}")
        overrides = [*(known[variant].get("overrides") or []), *(overrides or [])]
    mix_weights = None
    if d.get("sources"):
        from rsna_utils.sources.mix import plan_weights, present_sources
        here = _kernel_cwd()        # relative paths resolve where the notebooks' do
        resolved = [{k: str(here / v) if k in ("dir", "images", "csv") else v
                     for k, v in _substitute(s, ctx).items()} for s in d["sources"]]
        d["sources"] = (present_sources(resolved, require_sources,
                                        say or (lambda m: print(m, file=sys.stderr)))
                        if skip_missing else resolved)
        if d["sources"]:
            mix_weights = plan_weights(d["sources"])
    # the training data: the plan's sources combined, else the data folder
    ctx["train"] = run_dir.resolve() / MIX_DIR if d.get("sources") else ctx["data"]
    over: dict[str, dict] = {}
    for o in overrides or []:
        if "=" not in o:
            raise RsnaError(f"override {o!r}: write key=value or step.key=value")
        k, v = o.split("=", 1)
        step, _, key = k.rpartition(".")
        over.setdefault(step, {})[key] = _parse_value(v)
    names = [s.get("name", Path(s["notebook"]).stem) for s in d["steps"]]
    todo, suite = [], find_notebooks()
    for i, step in enumerate(d["steps"]):
        nb = suite / step["notebook"]
        if not nb.exists():
            raise RsnaError(f"plan step {i}: notebook {nb} not found")
        step_name = step.get("name", nb.stem)
        if only and step_name not in only:
            continue
        declared = set(pm.inspect_notebook(str(nb)))
        params = _substitute(dict(step.get("parameters", {})), ctx)
        # every step's first, then those naming or matching this step (the more specific wins)
        for scope in sorted(over, key=bool):
            if scope and not fnmatch.fnmatchcase(step_name, scope):
                continue
            for k, v in over[scope].items():
                if k in declared:
                    params[k] = _substitute(v, ctx)
        if mix_weights is not None:
            _give_weights(params, declared, mix_weights)
        unknown = set(params) - declared
        if unknown:
            raise RsnaError(f"plan step {step_name}: {nb.name} has no parameter(s) {sorted(unknown)}; "
                            f"its parameters: {sorted(declared)}")
        todo.append((i, step_name, nb, params))
    return d, run_dir, todo, names


def _give_weights(params: dict, declared: set, weights: dict) -> None:
    """A training step (its notebook declares `source_weights`, or `extra`) gets the plan's
    source weights, unless the step or an override already sets them."""
    if "source_weights" in declared:
        params.setdefault("source_weights", weights)
    elif "extra" in declared:
        extra = dict(params.get("extra") or {})
        extra.setdefault("source_weights", weights)
        params["extra"] = extra


TRAIN_NOTEBOOK = "03_train.ipynb"


def _give_overwrite(params: dict) -> dict:
    """A plan's training step replaces its own earlier run (`rsna train --overwrite`): running
    the plan again is the request (`run_plan` says so in one line; --name keeps runs apart).
    A step whose extra sets overwrite or resume itself keeps its choice."""
    extra = dict(params.get("extra") or {})
    if "resume" not in extra:
        extra.setdefault("overwrite", True)
    return {**params, "extra": extra}


def prepare_sources(d: dict, run_dir: Path, progress: bool = True) -> Path | None:
    """The plan's sources (resolved by `plan_steps`) combined into run_dir/sources ("{train}"),
    printed with their weights; None for a plan without sources."""
    if not d.get("sources"):
        return None
    from rsna_utils.sources.mix import combine_sources
    out = combine_sources(d["sources"], run_dir / MIX_DIR, progress=progress)
    listed = ", ".join(f"{s['name']} (weight {s['weight']:g})" for s in d["sources"])
    print(f"sources {listed} combined into {out}", file=sys.stderr, flush=True)
    return out


def run_plan(plan: str | Path, data: str | Path = "data/synthetic", runs: str | Path = "runs",
             name: str | None = None, overrides: list[str] | None = None,
             only: list[str] | None = None, progress: bool = True,
             weights: str | Path = KAGGLE_WEIGHTS, variant: str | None = None,
             external: str | Path = KAGGLE_EXTERNAL, require_sources: bool = False) -> dict:
    """Execute every step; returns {"run_dir", "notebooks": [...], "submission", "report"}.

    overrides: "key=value" strings applied to every step whose notebook has that parameter
    (e.g. ["epochs=1"]), or "step_name.key=value" for one step. weights: the folder that
    "{weights}" in a plan stands for, one sub-folder per model as `rsna weights export` writes
    them (default: where Kaggle mounts the dataset rsna-timm-weights)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from rsna_utils.reports import html as report
    d, run_dir, todo, names = plan_steps(plan, data, runs, name, overrides, only, weights,
                                         variant, external, require_sources)
    done = []
    _check_weights(d["name"], [(name, params) for _, name, _, params in todo])
    if run_dir.is_dir() and any(run_dir.glob("*.ipynb")):
        print(f"{run_dir} holds an earlier run of the plan: its steps run again and replace it "
              "(--name NAME keeps a new run apart)", file=sys.stderr, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_sources(d, run_dir, progress)
    for i, step_name, nb, params in todo:
        out = run_dir / f"{step_name}.ipynb"
        if nb.name == TRAIN_NOTEBOOK:
            params = _give_overwrite(params)
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(d['steps'])}] {nb.name} -> {out}", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3",
                                progress_bar=progress, cwd=str(_kernel_cwd()), log_output=False,
                                kernel_manager_class=_ipc_kernel_manager())
        except PapermillExecutionError as e:
            failed = dict(step=step_name, notebook=str(out),
                          seconds=round(time.perf_counter() - t0, 1))
            _report(report, run_dir, d["name"], done + [failed], names[i + 1:], step_name)
            raise RsnaError(f"notebook {step_name} failed in cell {e.exec_count}: {e.ename}: "
                            f"{e.evalue} (executed copy with the traceback: {out}; report: "
                            f"{run_dir / report.INDEX})") from None
        done.append(dict(step=step_name, notebook=str(out), seconds=round(time.perf_counter() - t0, 1)))
        _report(report, run_dir, d["name"], done, names[i + 1:])
    sub = run_dir / "submission.csv"
    kaggle = kaggle_working()
    if sub.exists() and Path(runs).resolve() == kaggle.resolve():
        # Kaggle scores /kaggle/working/submission.csv, not the plan's sub-folder
        shutil.copyfile(sub, kaggle / "submission.csv")
        sub = kaggle / "submission.csv"
    index = run_dir / report.INDEX
    return {"run_dir": str(run_dir), "notebooks": done,
            "submission": str(sub) if sub.exists() else None,
            "report": str(index) if index.exists() else None}


def _check_weights(plan: str, steps: list[tuple[str, dict]]) -> None:
    """Every step's pretrained_path, checked before the first step runs: a weights dataset
    that is not attached stops the plan now, not hours later at the step that needs it."""
    from rsna_utils.learn.weights import is_pypi
    here = _kernel_cwd()                # relative paths resolve where the notebooks run
    missing, written = [], []           # written: the run folders of the steps before
    for name, p in steps:
        path = p.get("pretrained_path")
        made = any(Path(str(path)).is_relative_to(w) for w in written)   # an earlier step's best.pt
        if (isinstance(path, str) and not is_pypi(path) and not made
                and not (here / path).exists()):
            missing.append((name, path))
        if isinstance(p.get("out"), str):
            written.append(Path(p["out"]))
    if not missing:
        return
    where = "; ".join(f"{name}: {path}" for name, path in missing)
    kaggle = sorted({Path(path).parts[3] for _, path in missing
                     if path.startswith(KAGGLE_INPUT + "/") and len(Path(path).parts) > 3})
    fix = (f"attach the Kaggle dataset(s) {', '.join(kaggle)} (written by `rsna weights export "
           "--model NAME --out DIR/NAME` on a machine with internet); off Kaggle, run the plan "
           "with --weights DIR" if kaggle else
           "put them there (`rsna weights export --model NAME --out DIR/NAME`), run the plan "
           "with --weights DIR, or override the step's pretrained_path")
    raise RsnaError(f"plan {plan}: pretrained weights not found for {len(missing)} step(s) "
                    f"({where}); nothing was run: {fix}")


def _ipc_kernel_manager():
    """A kernel manager that talks to its kernel over Unix sockets in a private temporary
    folder, not TCP on localhost: nothing listens on a port, and the kernel does not print
    "running over TCP without encryption" once per notebook."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.transport = "ipc"
            self.ip = str(Path(tempfile.mkdtemp(prefix="rsna-kernel-")) / "ipc")
    return IpcKernelManager


def _kernel_cwd() -> Path:
    """Where relative paths in parameters resolve: the checkout when the suite is the
    checkout's, else the caller's folder (a bundle under /kaggle/input is read-only)."""
    return REPO if find_notebooks() == REPO / "notebooks" else Path.cwd()


def _report(report, run_dir: Path, plan: str, steps: list[dict], pending: list[str],
            failed: str | None = None) -> Path:
    """HTML of the newest executed notebook + the run's index.html (a report that cannot be
    written is a warning: it never stops the run it describes)."""
    try:
        if Path(steps[-1]["notebook"]).exists():
            steps[-1]["html"] = str(report.notebook_html(steps[-1]["notebook"]))
        return report.write_index(run_dir, plan, steps, failed, pending)
    except Exception as e:        # noqa: BLE001 (nbconvert raises many kinds)
        print(f"warning: the HTML report of {run_dir} was not written ({type(e).__name__}: {e})",
              file=sys.stderr)
        return run_dir / report.INDEX
