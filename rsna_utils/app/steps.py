"""Subcommands for preprocessing, training and prediction (registered by rsna_utils.app.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rsna_utils.core.errors import RsnaError


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from rsna_utils.app.command_configs import PreprocessRunConfig
    from rsna_utils.core.config import given_flags
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    cfg = PreprocessConfig.from_dict(given_flags(a, PreprocessConfig))
    run = PreprocessRunConfig.from_dict(given_flags(a, PreprocessRunConfig))
    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.dicom.decoders.registry import DecoderSet
    from rsna_utils.image import gpu
    cuda = run.backend in ("auto", *gpu_batch.GPU_BACKENDS) and gpu_batch.cuda_available()
    decoders = DecoderSet.find(run.backend, "cuda" if cuda else "cpu")   # once for the whole run
    chosen = gpu_batch.resolve_backend(run.backend, decoders=decoders)
    if chosen in gpu_batch.GPU_BACKENDS:
        if not cuda:
            raise RsnaError(f"--backend {run.backend}: no CUDA GPU here; use --backend auto or a "
                            "CPU backend")
        s = gpu.GpuPreprocessor(cfg, backend=chosen, batch_size=run.batch_size,
                                progress=run.progress, decoders=decoders).run(
            run.images, run.csv, run.out, run.shard)
        print(s.line(f" [{chosen} on the GPU, {s.fallbacks} via the CPU fallback]"))
    else:
        s = Preprocessor(cfg, backend=run.backend, workers=run.workers, progress=run.progress,
                         decoders=decoders).run(run.images, run.csv, run.out, run.shard)
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
    from rsna_utils.infer.engine import EXPORTED_RUNTIMES, engines_folder
    if a.ensemble and settings.get("runtime") in EXPORTED_RUNTIMES and not settings.get("engines"):
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


def ensemble_checkpoints(path: str) -> list[str]:
    from rsna_utils.infer.ensemble import ensemble_checkpoints as members
    return members(path)


def _ensemble_settings(path: str, given: dict) -> dict:
    """What `--ensemble ensemble.json` (of `rsna oof`) sets (`Ensemble.predict_settings`)."""
    from rsna_utils.infer.ensemble import Ensemble
    return Ensemble.read(path, checkpoints=False).predict_settings(given, source=path,
                                                                   follow_tta=False)




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
    from rsna_utils.app.command_configs import PlanRunConfig
    from rsna_utils.core.config import given_flags
    cfg = PlanRunConfig.from_dict(given_flags(a, PlanRunConfig))
    where = cfg.where()
    if cfg.estimate or cfg.calibrate:
        from rsna_utils.app import estimate as est
        rates = None
        if cfg.calibrate:
            cals = est.calibrate_plan(cfg.plan, cfg.data, cfg.calibrate_steps,
                                      progress=cfg.progress, **where)
            print(f"Measured here ({cfg.calibrate_steps} steps each, random uint8 input made on "
                  "the device):\n" + est.calibration_table(cals) + "\n")
            rates = est.measured_rates(cals)
        d, notes = load_plan(cfg.plan), []
        rows = est.estimate_plan(cfg.plan, cfg.data, cfg.gpu, memory=not cfg.calibrate,
                                 rates=rates, notes=notes, **where)
        print(est.table(rows, cfg.gpu, notes))
        budget = d.get("budget_hours")
        if cfg.variant:
            budget = (d.get("variants") or {}).get(cfg.variant, {}).get("budget_hours", budget)
        if cfg.budget_hours is not None:
            budget = cfg.budget_hours
        print(est.check_budget(rows, budget, d["name"] + (f" --variant {cfg.variant}"
                                                          if cfg.variant else ""), cfg.gpu))
        return 0
    _print_run(run_plan(cfg.plan, cfg.data, progress=cfg.progress, **where))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from rsna_utils.app.notebooks import load_plan, run_plan
    from rsna_utils.app.command_configs import DemoConfig
    from rsna_utils.core.config import given_flags
    from rsna_utils.sources.synth import synthesize
    cfg = DemoConfig.from_dict(given_flags(a, DemoConfig))
    name = load_plan(cfg.plan)["name"]        # a mistyped plan is named here, before any data
    if not (Path(cfg.data) / "train.csv").exists():
        if name != "demo":
            # only the demo plan is meant for generated data: a mistyped DATA for a real plan
            # must not run it on synthetic patients without a word
            raise RsnaError(f"{Path(cfg.data) / 'train.csv'}: not found, and the {name!r} plan "
                            "runs on a real dataset: point DATA (--data) at the competition's "
                            "folder (train.csv, train_images/, test.csv, test_images/), or use "
                            "PLAN=demo, which generates synthetic data")
        print(f"generating the synthetic dataset in {cfg.data} ...", flush=True)
        synthesize(cfg.data, patients=cfg.patients, seed=0, positive_rate=cfg.positive_rate,
                   size="small", progress=cfg.progress)
    else:
        print(reused_data(Path(cfg.data)), flush=True)
    _print_run(run_plan(cfg.plan, cfg.data, cfg.runs, None, cfg.param, progress=cfg.progress,
                        weights=cfg.weights))
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
    from rsna_utils.app.command_configs import IngestConfig
    from rsna_utils.core.config import given_flags
    from rsna_utils.sources.ingest import combine, ingest
    cfg = IngestConfig.from_dict(given_flags(a, IngestConfig))
    if cfg.combine:
        r = combine(cfg.out, cfg.combine, progress=cfg.progress)
        what = f"{len(cfg.combine)} folders (sites {', '.join(map(str, r['site_ids']))})"
    else:
        r = ingest(cfg.format, cfg.src, cfg.out, meta=cfg.meta, progress=cfg.progress)
        what = f"{cfg.src} as site {r['site_id']}"
    print(f"ingested {r['images']} images of {r['patients']} patients ({r['positive_images']} "
          f"positive, {r['positive_breasts']} positive breasts) from {what}; {r['unmapped']} "
          f"source rows unmapped (see unmapped.csv); wrote {r['out']}")
    return 0


def _flags(parser, cls) -> None:
    from rsna_utils.core.config import add_flags
    add_flags(parser, cls)                # one flag per field of the config


def _reg_preprocess(sub) -> None:
    from rsna_utils.app.command_configs import PreprocessRunConfig
    from rsna_utils.image.convert import PreprocessConfig
    p = sub.add_parser("preprocess", help="DICOM folder -> cropped, windowed, resized PNGs")
    _flags(p, PreprocessRunConfig)
    _flags(p, PreprocessConfig)
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
    from rsna_utils.app.command_configs import PlanRunConfig
    n = sub.add_parser("notebooks", help="run a notebook plan headless with papermill")
    _flags(n, PlanRunConfig)
    n.set_defaults(func=_cmd_notebooks)


def _reg_demo(sub) -> None:
    from rsna_utils.app.command_configs import DemoConfig
    d = sub.add_parser("demo", help="synthetic data + the demo notebook plan (make demo)")
    _flags(d, DemoConfig)
    d.set_defaults(func=_cmd_demo)


def _reg_ingest(sub) -> None:
    """`rsna ingest`: a public dataset (CBIS-DDSM, VinDr-Mammo, CMMD) in the RSNA shape."""
    from rsna_utils.app.command_configs import IngestConfig
    from rsna_utils.sources.ingest import FORMATS
    g = sub.add_parser("ingest", help="a public mammography dataset -> RSNA-shaped train.csv and "
                       "train_images/ links (sites: " + ", ".join(
                           f"{k} {f.site_id}" for k, f in FORMATS.items()) + ")")
    _flags(g, IngestConfig)
    g.set_defaults(func=_cmd_ingest)


# the subcommands of this module by name; `rsna --help` lists them in pipeline order (cli.py)
REGISTER = {"preprocess": _reg_preprocess, "train": _reg_train, "oof": _reg_oof,
            "export": _reg_export, "predict": _reg_predict, "evaluate": _reg_evaluate,
            "explain": _reg_explain, "notebooks": _reg_notebooks, "demo": _reg_demo,
            "ingest": _reg_ingest}
