"""Subcommands for preprocessing, training and prediction (registered by rsna_utils.app.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rsna_utils.core.errors import RsnaError


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    cfg = PreprocessConfig.from_dict(given_flags(a, PreprocessConfig))
    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.image import gpu
    chosen = gpu_batch.resolve_backend(a.backend)
    if chosen in gpu_batch.GPU_BACKENDS:
        if not gpu_batch.cuda_available():
            from rsna_utils.core.errors import RsnaError
            raise RsnaError(f"--backend {a.backend}: no CUDA GPU here; use --backend auto or a CPU backend")
        s = gpu.GpuPreprocessor(cfg, backend=chosen, batch_size=a.batch_size,
                                progress=not a.quiet).run(a.images, a.csv, a.out, a.shard)
        print(s.line(f" [{chosen} on the GPU, {s.fallbacks} via the CPU fallback]"))
    else:
        backend = "auto" if a.backend == "auto" else a.backend
        s = Preprocessor(cfg, backend=backend, workers=a.workers,
                         progress=not a.quiet).run(a.images, a.csv, a.out, a.shard)
        print(s.line())
    return 1 if s.processed + s.skipped == 0 and s.failed > 0 else 0


def _cmd_train(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.learn.train import TrainConfig, train
    flags = given_flags(a, TrainConfig)           # flags given override the YAML's fields
    cfg = TrainConfig.from_yaml(a.config, **flags) if a.config else TrainConfig.from_dict(flags)
    try:
        best = train(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_run(cfg)) from None
    if best:
        m = best["metrics"]
        print(f"best epoch {best['epoch']}: breast pF1 {m['breast_mean_pf1']:.3f}, breast AUC "
              f"{m['breast_mean_auc']:.3f}; checkpoints in {cfg.out}")
    return 0


def interrupted_run(cfg) -> str:
    """How to go on after Ctrl-C in `rsna train`: the epochs kept in OUT/last.pt, and --resume."""
    import pandas as pd
    out = Path(cfg.out)
    try:
        done = len(pd.read_csv(out / "metrics.csv")) if (out / "last.pt").exists() else 0
    except (OSError, ValueError):
        done = 0
    instead = " instead of --overwrite" if cfg.overwrite else ""
    if done:
        return (f"{done} of {cfg.epochs} epochs kept in {out / 'last.pt'}; the same command with "
                f"--resume{instead} continues from there")
    return (f"no epoch finished, none kept in {out}; run the same command again (--resume "
            "continues a run once an epoch is kept)")


def _cmd_oof(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.infer.oof import OofConfig
    cfg = OofConfig.from_dict(given_flags(a, OofConfig))
    r = cfg.run()
    print(f"{r['n_breasts']} out-of-fold breasts ({r['n_positives']} positive) from {len(cfg.runs)} runs: "
          f"AUC {r['auc']:.3f}, PR-AUC {r['pr_auc']:.3f}; binarised pF1 {r['pf1']:.3f} at "
          f"{r['binarize']} (threshold {r['threshold']:.4f}, which flags {r['quantile']:.1%} of "
          f"the breasts: `--binarize quantile` flags that share instead); wrote {cfg.out}")
    c = r.get("calibrator")
    if c and "ece_after" in c.get("cross_fitted", {}):
        x = c["cross_fitted"]
        print(f"  {c['method']} calibrator: held-out ECE {x['ece_before']:.4f} -> {x['ece_after']:.4f}, "
              f"Brier {x['brier_before']:.4f} -> {x['brier_after']:.4f} ({x['folds']} folds)")
    elif r.get("calibration_error"):
        print(f"  no calibrator: {r['calibration_error']}")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.infer.predict import PredictConfig, predict
    settings = given_flags(a, PredictConfig)
    if a.ensemble:
        settings.update(_ensemble_settings(a.ensemble, settings))
        if not settings.get("checkpoints"):         # the ensemble's own members
            settings["checkpoints"] = ensemble_checkpoints(a.ensemble)
    elif not settings.get("checkpoints"):
        raise RsnaError("no --checkpoints given: pass the best.pt files of `rsna train`, or "
                        "--ensemble ENSEMBLE.json (of `rsna oof` or an export), which lists them")
    if a.ensemble and settings.get("runtime") == "onnx" and not settings.get("engines"):
        from rsna_utils.infer.engine import engines_folder
        settings["engines"] = engines_folder(a.ensemble)
    cfg = PredictConfig(**settings)
    r = predict(cfg)
    n = len(r.images)
    print(f"predicted {n} images ({r.counts()}: see the warnings file) for "
          f"{len(r.submission)} breasts in {r.seconds:.1f} s ({n / r.seconds:.2f} img/s)"
          + (f"; wrote {cfg.out}" if cfg.out else ""))
    if r.metrics:
        m = r.metrics
        for lvl in ("image", "breast_mean", "breast_max"):
            print(f"  {lvl:12s} pF1 {m[f'{lvl}_pf1']:.4f}  AUC {m[f'{lvl}_auc']:.4f}  "
                  f"PR-AUC {m[f'{lvl}_pr_auc']:.4f}  best threshold {m[f'{lvl}_best_threshold']:.4f}"
                  f" -> F1 {m[f'{lvl}_best_f1']:.4f}")
    return 0


def _ensemble_settings(path: str, given: dict) -> dict:
    """What `--ensemble ensemble.json` (of `rsna oof`) sets (`Ensemble.predict_settings`)."""
    from rsna_utils.infer.ensemble import Ensemble
    return Ensemble.read(path, checkpoints=False).predict_settings(given, source=path,
                                                                   follow_tta=False)


def ensemble_checkpoints(path: str) -> list[str]:
    """The members of ensemble.json: an export's checkpoints (beside it), else the best.pt of
    each run `rsna oof` merged (its "runs", as given to it)."""
    from rsna_utils.infer.ensemble import Ensemble
    ens = Ensemble.read(path, checkpoints=False)
    if ens.get("checkpoints"):
        return list(Ensemble.read(path, checkpoints=True)["checkpoints"])
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


def _cmd_export(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.infer.export import ExportConfig
    print(ExportConfig.from_dict(given_flags(a, ExportConfig)).run()["line"])
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.reports.evaluate import EvaluateConfig
    cfg = EvaluateConfig.from_dict(given_flags(a, EvaluateConfig))
    r = cfg.run()
    h = r["headline"]
    ci = lambda k: f"{h[k]:.3f} [{h[k + '_low']:.3f}, {h[k + '_high']:.3f}]"   # noqa: E731
    print(f"{h['n']} breasts ({h['n_positives']} positive) of {h['n_patients']} patients, 95% CI "
          f"by patient ({h['n_boot']} resamples):\n  AUC {ci('auc')}  PR-AUC {ci('pr_auc')}  "
          f"pF1 {ci('pf1')}\n  at threshold {h['threshold']:.4f} ({h['threshold_source']}): "
          f"F1 {ci('f1')}  sensitivity {ci('sensitivity')}  specificity {ci('specificity')}\n"
          f"  Brier {ci('brier')}  ECE {ci('ece')}")
    for k, why in r["skipped"].items():
        print(f"  no {k} breakdown: {why}")
    print(f"wrote {', '.join(Path(p).name for p in [*r['files'].values(), *r['figures'].values()])} "
          f"to {a.out}")
    return 0


def _print_run(res: dict) -> None:
    print(f"executed notebooks in {res['run_dir']}:")
    for n in res["notebooks"]:
        print(f"  {n['notebook']}  ({n['seconds']} s)")
    if res["submission"]:
        print(f"submission: {res['submission']}")
    if res.get("report"):
        print(f"report (open in a browser): {res['report']}")


def _cmd_notebooks(a: argparse.Namespace) -> int:
    from rsna_utils.app.notebooks import load_plan, run_plan
    where = dict(runs=a.runs, name=a.name, overrides=a.param, weights=a.weights,
                 variant=a.variant, external=a.external, require_sources=a.require_sources)
    if a.estimate or a.calibrate:
        from rsna_utils.app import estimate as est
        rates = None
        if a.calibrate:
            cals = est.calibrate_plan(a.plan, a.data, a.calibrate_steps, progress=not a.quiet,
                                      **where)
            print(f"Measured here ({a.calibrate_steps} steps each, random uint8 input made on "
                  "the device):\n" + est.calibration_table(cals) + "\n")
            rates = est.measured_rates(cals)
        d, notes = load_plan(a.plan), []
        rows = est.estimate_plan(a.plan, a.data, a.gpu, memory=not a.calibrate, rates=rates,
                                 notes=notes, **where)
        print(est.table(rows, a.gpu, notes))
        budget = d.get("budget_hours")
        if a.variant:
            budget = (d.get("variants") or {}).get(a.variant, {}).get("budget_hours", budget)
        if a.budget_hours is not None:
            budget = a.budget_hours
        print(est.check_budget(rows, budget, d["name"] + (f" --variant {a.variant}" if a.variant
                                                          else ""), a.gpu))
        return 0
    _print_run(run_plan(a.plan, a.data, progress=not a.quiet, **where))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rsna_utils.app.notebooks import load_plan, run_plan
    from rsna_utils.sources.synth import synthesize
    name = load_plan(a.plan)["name"]          # a mistyped plan is named here, before any data
    if not (Path(a.data) / "train.csv").exists():
        if name != "demo":
            # only the demo plan is meant for generated data: a mistyped DATA for a real plan
            # must not run it on synthetic patients without a word
            raise RsnaError(f"{Path(a.data) / 'train.csv'}: not found, and the {name!r} plan "
                            "runs on a real dataset: point DATA (--data) at the competition's "
                            "folder (train.csv, train_images/, test.csv, test_images/), or use "
                            "PLAN=demo, which generates synthetic data")
        print(f"generating the synthetic dataset in {a.data} ...", flush=True)
        synthesize(a.data, patients=a.patients, seed=0, positive_rate=a.positive_rate,
                   size="small", progress=not a.quiet)
    else:
        print(reused_data(Path(a.data)), flush=True)
    _print_run(run_plan(a.plan, a.data, a.runs, None, a.param, progress=not a.quiet,
                        weights=a.weights))
    return 0


def reused_data(data: Path) -> str:
    """`rsna demo` on a folder that already holds a dataset: one line saying so (what is in it,
    and how to make a new one), since --patients and --positive-rate then do nothing."""
    import pandas as pd
    try:
        t = pd.read_csv(data / "train.csv", usecols=["patient_id"])
        what = f"{len(t)} images of {t.patient_id.nunique()} patients"
    except (OSError, ValueError):
        what = "its train.csv"
    return (f"using the dataset already in {data} ({what}), not a new one: `rsna synth --out "
            f"{data} --overwrite` (make synth OVERWRITE=1) replaces it, or give another --data "
            "(DATA=)")


def _cmd_explain(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.reports.exam import ExplainConfig
    r = ExplainConfig.from_dict(given_flags(a, ExplainConfig)).run()
    n_pos = int(r["exams"]["positive"].sum())
    print(f"explained {len(r['views'])} views of {len(r['exams'])} exams ({n_pos} positive at "
          f"threshold {r['threshold']:.4f}) in {r['seconds']:.1f} s; open {r['index']} "
          f"(peaks per view in {r['heatmaps_csv']})")
    return 0


def _cmd_ingest(a: argparse.Namespace) -> int:
    from rsna_utils.sources.ingest import combine, ingest
    if a.combine:
        if a.format or a.src or a.meta:
            raise RsnaError("--combine takes no --format, --src or --meta: it joins folders that "
                            "`rsna ingest` (or the competition) already made")
        r = combine(a.out, a.combine, progress=not a.quiet)
        what = f"{len(a.combine)} folders (sites {', '.join(map(str, r['site_ids']))})"
    else:
        if not (a.format and a.src):
            raise RsnaError("rsna ingest needs --format and --src (or --combine DIR DIR ...)")
        r = ingest(a.format, a.src, a.out, meta=a.meta, progress=not a.quiet)
        what = f"{a.src} as site {r['site_id']}"
    print(f"ingested {r['images']} images of {r['patients']} patients ({r['positive_images']} "
          f"positive, {r['positive_breasts']} positive breasts) from {what}; {r['unmapped']} "
          f"source rows unmapped (see unmapped.csv); wrote {r['out']}")
    return 0


def _flags(parser, cls) -> None:
    from rsna_utils.core.config import add_flags
    add_flags(parser, cls)                # one flag per field of the config


def _reg_preprocess(sub) -> None:
    from rsna_utils.image.convert import PreprocessConfig
    p = sub.add_parser("preprocess", help="DICOM folder -> cropped, windowed, resized PNGs")
    p.add_argument("--images", required=True, help="folder of {patient_id}/{image_id}.dcm")
    p.add_argument("--csv", default=None, help="train.csv / test.csv (default: scan --images)")
    p.add_argument("--out", required=True, help="output folder (PNGs, meta.csv, failures.csv)")
    _flags(p, PreprocessConfig)
    p.add_argument("--backend", default="auto",
                   help="auto (a GPU backend when CUDA and the package are present), "
                        "imagecodecs, dicomsdl, pydicom, nvimgcodec, dali")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32, help="GPU decode batch")
    p.add_argument("--shard", default=None, help="K/N: process shard K (from 0) of N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_preprocess)


def _reg_train(sub) -> None:
    from rsna_utils.learn.train_config import TrainConfig
    t = sub.add_parser("train", help="train a timm model on preprocessed PNGs")
    t.add_argument("--config", help="YAML with any TrainConfig field; flags override it")
    _flags(t, TrainConfig)
    t.set_defaults(func=_cmd_train)


def _reg_oof(sub) -> None:
    from rsna_utils.infer.oof import OofConfig
    o = sub.add_parser("oof", help="merge out-of-fold predictions, tune the ensemble's threshold")
    _flags(o, OofConfig)
    o.set_defaults(func=_cmd_oof)


def _reg_predict(sub) -> None:
    from rsna_utils.infer.predict import PredictConfig
    q = sub.add_parser("predict", help="test DICOMs + checkpoints -> submission.csv")
    _flags(q, PredictConfig)
    for action in q._actions:       # --ensemble lists the checkpoints: not required with it
        if action.dest == "checkpoints":
            action.required = False
            action.help += " (default with --ensemble: the ones it lists)"
    q.add_argument("--ensemble", default=None,
                   help="ensemble.json of `rsna oof` or an export: its aggregation, its "
                   "checkpoints (unless --checkpoints), and binary output at its out-of-fold "
                   "threshold (or its calibrator with --output calibrated)")
    q.set_defaults(func=_cmd_predict)


def _reg_export(sub) -> None:
    from rsna_utils.infer.export import ExportConfig
    x = sub.add_parser("export", help="checkpoints -> ONNX models with their input contracts "
                       "and ensemble.json, for `rsna predict --runtime onnx`")
    _flags(x, ExportConfig)
    x.set_defaults(func=_cmd_export)


def _reg_evaluate(sub) -> None:
    from rsna_utils.reports.evaluate import EvaluateConfig
    e = sub.add_parser("evaluate", help="labelled predictions -> metrics with 95%% CIs by patient, "
                       "subgroups, curves, calibration (CSV + PNG)")
    _flags(e, EvaluateConfig)
    e.set_defaults(func=_cmd_evaluate)


def _reg_explain(sub) -> None:
    """`rsna explain`: per-exam figures with class-activation heat, index.html, heatmaps.csv."""
    from rsna_utils.reports.exam import ExplainConfig
    x = sub.add_parser("explain", help="per-exam figures: the views, HiResCAM heat mapped to the "
                       "original pixels, scores and decision; index.html; heatmaps.csv")
    _flags(x, ExplainConfig)
    x.set_defaults(func=_cmd_explain)


def _reg_notebooks(sub) -> None:
    from rsna_utils.infer.kaggle import KAGGLE_EXTERNAL, KAGGLE_WEIGHTS
    n = sub.add_parser("notebooks", help="run a notebook plan headless with papermill")
    n.add_argument("--plan", default="demo", help="demo, kaggle, submit, or a plan YAML path")
    n.add_argument("--data", default="data/synthetic", help="dataset folder ({data} in the plan)")
    n.add_argument("--runs", default="runs", help="executed notebooks go to RUNS/<plan name>/")
    n.add_argument("--name", default=None, help="run name (default: the plan's)")
    n.add_argument("--weights", default=KAGGLE_WEIGHTS, help="folder of pretrained weights, one "
                   "sub-folder per model (`rsna weights export --out DIR/MODEL`): {weights} in "
                   "the plan (default: %(default)s, the Kaggle dataset)")
    n.add_argument("-p", "--param", action="append", default=[],
                   help="override a parameter: key=value (all steps) or step.key=value")
    n.add_argument("--quiet", action="store_true", help="no progress bars")
    n.add_argument("--estimate", action="store_true", help="run nothing: print each step's "
                   "images, batches, expected hours on one GPU and training memory per batch")
    n.add_argument("--gpu", default="h100", choices=("h100", "h200", "t4", "t4x2"),
                   help="with --estimate: the GPU to estimate for; t4x2: Kaggle's two T4s, the "
                   "submit plan's test patients split over both (shards: auto), training on one "
                   "(default: %(default)s)")
    n.add_argument("--variant", default=None, help="a named variant of the plan (its "
                   "`variants:`, e.g. the kaggle plan's 12h)")
    n.add_argument("--external", default=KAGGLE_EXTERNAL, help="folder of public sources "
                   "ingested by `rsna ingest`, one sub-folder each: {external} in the plan "
                   "(default: %(default)s); a missing one is skipped with one line")
    n.add_argument("--require-sources", action="store_true", help="stop when a source folder "
                   "of the plan is missing, instead of training without it")
    n.add_argument("--budget-hours", type=float, default=None, help="with --estimate: refuse a "
                   "plan longer than this (default: the plan's budget_hours)")
    n.add_argument("--calibrate", action="store_true", help="run nothing of the plan: time the "
                   "first steps of each training step's model here (random input on the device) "
                   "and print the estimate from those measured rates")
    n.add_argument("--calibrate-steps", type=int, default=200, help="with --calibrate: timed "
                   "optimiser steps per model (default: %(default)s)")
    n.set_defaults(func=_cmd_notebooks)


def _reg_demo(sub) -> None:
    from rsna_utils.infer.kaggle import KAGGLE_WEIGHTS
    d = sub.add_parser("demo", help="synthetic data + the demo notebook plan (make demo)")
    d.add_argument("--data", default="data/synthetic", help="the dataset folder: generated there "
                   "when it has no train.csv (default: %(default)s)")
    d.add_argument("--plan", default="demo", help="the plan to run on it (default: %(default)s; "
                   "another plan needs a DATA with a train.csv)")
    d.add_argument("--runs", default="runs", help="executed notebooks and the report go to "
                   "RUNS/<plan name>/ (default: %(default)s)")
    d.add_argument("--patients", type=int, default=60, help="synthetic train patients, about 4 "
                   "images each (default: %(default)s)")
    d.add_argument("--positive-rate", type=float, default=0.3,
                   help="share of synthetic patients with cancer, raised from the real 2%% so "
                   "the small validation split has positives (default: %(default)s)")
    d.add_argument("--weights", default=KAGGLE_WEIGHTS, help="folder of pretrained weights for "
                   "{weights} in the plan, as for `rsna notebooks` (default: %(default)s)")
    d.add_argument("-p", "--param", action="append", default=[],
                   help="override a parameter: key=value (all steps) or step.key=value")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)


def _reg_ingest(sub) -> None:
    """`rsna ingest`: a public dataset (CBIS-DDSM, VinDr-Mammo, CMMD) in the RSNA shape."""
    from rsna_utils.sources.ingest import FORMATS
    g = sub.add_parser("ingest", help="a public mammography dataset -> RSNA-shaped train.csv and "
                       "train_images/ links (sites: " + ", ".join(
                           f"{k} {f.site_id}" for k, f in FORMATS.items()) + ")")
    g.add_argument("--format", choices=list(FORMATS), default=None, help="the source's layout")
    g.add_argument("--src", default=None, help="the dataset's folder as its publisher lays it out")
    g.add_argument("--meta", default=None, help="the source's tables (a file or folder) when they "
                   "are not in --src (default: look in --src)")
    g.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="instead: join these ingested or RSNA-shaped folders into --out "
                   "(colliding image or patient ids are refused)")
    g.add_argument("--out", required=True, help="output folder (replaced; train.csv, "
                   "train_images/, id_map.csv, unmapped.csv, ingest.json)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_ingest)


# the subcommands of this module by name; `rsna --help` lists them in pipeline order (cli.py)
REGISTER = {"preprocess": _reg_preprocess, "train": _reg_train, "oof": _reg_oof,
            "export": _reg_export, "predict": _reg_predict, "evaluate": _reg_evaluate,
            "explain": _reg_explain, "notebooks": _reg_notebooks, "demo": _reg_demo,
            "ingest": _reg_ingest}
