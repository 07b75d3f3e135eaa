"""TrainConfig / PredictConfig: checked on creation, and the one spelling of every setting that
the CLI flags, YAML files and notebooks derive from (rsna_utils.core.config)."""
import dataclasses
import inspect

import pytest
import yaml

from rsna_utils.app.cli import build_parser, main
from rsna_utils.core.config import given_flags
from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.predict import PredictConfig, predict
from rsna_utils.learn.train_config import TrainConfig

# field -> (a YAML value, the flag text, the value the config then holds); every field but
# `extra` (a dict: YAML and Python only) must be listed, so a new field needs a row here
TRAIN_VALUES = {
    "data": ("png", "png", "png"),
    "csv": ("t.csv", "t.csv", "t.csv"),
    "out": ("runs/x", "runs/x", "runs/x"),
    "split": ("kfold", "kfold", "kfold"),
    "val_frac": (0.3, "0.3", 0.3),
    "folds": (4, "4", 4),
    "fold": (3, "3", 3),
    "seed": (7, "7", 7),
    "workers": (0, "0", 0),
    "cache": (True, "true", True),
    "upsample": (5.0, "5", 5.0),
    "min_positives": (1, "1", 1),
    "target_ratio": (None, "none", None),
    "augment": (True, "true", True),
    "aug_level": ("heavy", "heavy", "heavy"),
    "random_crop": (0.2, "0.2", 0.2),
    "aux": (["BIRADS", "view"], "BIRADS,view", ["BIRADS", "view"]),
    "source_weights": ({"cbis-ddsm": 0.5, "102": 2.0}, "cbis-ddsm=0.5,102=2",
                       {"cbis-ddsm": 0.5, "102": 2.0}),
    "val_sites": ([1, 101], "1,101", [1, 101]),
    "model": ("efficientnet_b2", "efficientnet_b2", "efficientnet_b2"),
    "level": ("breast", "breast", "breast"),
    "breast_views": ("random", "random", "random"),
    "size": ([1024, 512], "1024x512", [1024, 512]),
    "channels": (1, "1", 1),
    "pretrained_path": ("w/r18", "w/r18", "w/r18"),
    "global_pool": ("avg", "avg", "avg"),
    "drop_path": (0.1, "0.1", 0.1),
    "head_dropout": (0.5, "0.5", 0.5),
    "channels_last": (False, "false", False),
    "epochs": (8, "8", 8),
    "batch_size": (4, "4", 4),
    "accumulate": (2, "2", 2),
    "lr": (0.001, "0.001", 0.001),
    "backbone_lr": (0.1, "0.1", 0.1),
    "weight_decay": (0.05, "0.05", 0.05),
    "warmup_epochs": (1.0, "1", 1.0),
    "pos_weight": (5.0, "5", 5.0),
    "neg_weight": (2.0, "2", 2.0),
    "label_smoothing": (0.05, "0.05", 0.05),
    "aux_weight": (0.3, "0.3", 0.3),
    "ema": (0.999, "0.999", 0.999),
    "ema_epochs": (0.5, "0.5", 0.5),
    "select_window": (3, "3", 3),
    "compile": (True, "true", True),
    "amp": ("bf16", "bf16", "bf16"),
    "tta": (True, "true", True),
    "select_by": ("pr_auc", "pr_auc", "pr_auc"),
    "device": ("cpu", "cpu", "cpu"),
    "resume": (True, "true", True),
    "overwrite": (True, "true", True),
    "max_steps": (3, "3", 3),
    "progress": (False, None, False),     # --quiet
}


def test_the_table_covers_every_training_field():
    assert set(TRAIN_VALUES) == set(TrainConfig.field_names()) - {"extra"}


@pytest.mark.parametrize("name", sorted(TRAIN_VALUES))
def test_every_training_field_from_yaml_and_from_its_flag(name, tmp_path):
    yaml_value, text, held = TRAIN_VALUES[name]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({name: yaml_value}))
    assert getattr(TrainConfig.from_yaml(tmp_path / "t.yaml"), name) == yaml_value
    flag = ["--quiet"] if text is None else ["--" + name.replace("_", "-"), text]
    a = build_parser().parse_args(["train", *flag])
    flags = given_flags(a, TrainConfig)
    assert list(flags) == [name]                      # only what was typed
    assert getattr(TrainConfig(**flags), name) == held
    assert getattr(TrainConfig.from_namespace({name: yaml_value}), name) == yaml_value


def test_the_old_flag_spellings_still_parse():
    a = build_parser().parse_args(
        ["train", "--data", "d", "--csv", "c", "--out", "o", "--model", "resnet18", "--size", "48",
         "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--max-steps",
         "3", "--quiet", "--resume", "--augment", "true", "--aux", "BIRADS,density"])
    cfg = TrainConfig(**given_flags(a, TrainConfig))
    assert (cfg.size, cfg.batch_size, cfg.max_steps, cfg.progress, cfg.resume, cfg.augment,
            cfg.aux) == ([48, 48], 4, 3, False, True, True, ["BIRADS", "density"])
    a = build_parser().parse_args(
        ["predict", "--images", "i", "--csv", "c", "--checkpoints", "a.pt", "b.pt", "--tta",
         "--binarize", "quantile:0.02", "--sample-submission", "s.csv", "--quiet", "--workers", "1"])
    cfg = PredictConfig(**given_flags(a, PredictConfig))
    assert (cfg.checkpoints, cfg.tta, cfg.binarize_how, cfg.sample_submission, cfg.progress,
            cfg.workers, cfg.out) == (["a.pt", "b.pt"], True, "quantile:0.02", "s.csv", False, 1,
                                      "submission.csv")


@pytest.mark.parametrize("kw, message", [
    (dict(epochs=0), r"^epochs=0: give an integer >= 1$"),
    (dict(epochs="2"), r"^epochs='2': give an integer$"),
    (dict(lr=0), r"^lr=0: give a number > 0$"),
    (dict(val_frac=1.0), r"^val_frac=1.0: give a number in \(0, 1\)$"),
    (dict(split="random"), r"^split='random': choose holdout or kfold$"),
    (dict(fold=4, folds=4), r"^fold=4: choose 0..3 \(folds=4\)$"),
    (dict(folds=1), r"^folds=1: give an integer >= 2$"),
    (dict(select_by="f1"), r"^select_by='f1': choose auc, pr_auc or pf1$"),
    (dict(amp="fp8"), r"^amp='fp8': choose auto, bf16, fp16 or off$"),
    (dict(size="1024by512"), r"^size='1024by512': not a whole number of pixels; give 512 or "
                             r"HEIGHTxWIDTH"),
    (dict(size=[16, 16]), r"^size=\[16, 16\]: a side below 32 pixels; give 512 or HEIGHTxWIDTH "
                          r"such as 1024x512, each side >= 32$"),
    (dict(size="12x34x5"), r"^size='12x34x5': 3 sides; give 512 or HEIGHTxWIDTH"),
    (dict(channels=2), r"^channels=2: choose 1 or 3$"),
    (dict(augment="yes"), r"^augment='yes': give true or false$"),
    (dict(ema=1.0), r"^ema=1.0: give a number in \[0, 1\)$"),
    (dict(max_steps=0), r"^max_steps=0: give an integer >= 1$"),
    (dict(extra={"modle": 1}), r"^extra: unknown training option 'modle'; valid: \["),
    (dict(ema=0.5, extra={"ema": 0.9}), r"^ema given twice: 0.5 and extra's 0.9; keep one$"),
])
def test_training_settings_are_checked_on_creation(kw, message):
    with pytest.raises(RsnaError, match=message):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(agg="median"), r"^agg='median': choose mean or max$"),
    (dict(workers=-1), r"^workers=-1: give an integer >= 0$"),
    (dict(threshold=1.5), r"^threshold=1.5: give a number in \[0, 1\]$"),
    (dict(binarize_how="top"), r"^binarize_how='top': choose threshold or quantile:Q"),
    (dict(binarize_how="quantile:2"), r"^binarize_how='quantile:2': the share must be in \(0, 1\)"),
    (dict(output="logit"), r"^output='logit': choose probability, calibrated or binary$"),
    (dict(output="probability", binarize_how="threshold"), r"--output probability: binarising"),
    (dict(output="calibrated"), r"needs a calibrator"),
])
def test_prediction_settings_are_checked_on_creation(kw, message):
    with pytest.raises(RsnaError, match=message):
        PredictConfig("test_images", "test.csv", ["best.pt"], **kw)


def test_extra_reaches_any_field_and_notebooks_pass_their_parameters():
    cfg = TrainConfig(extra={"ema": 0.999, "amp": "bf16"})
    assert (cfg.ema, cfg.amp, cfg.extra) == (0.999, "bf16", {})
    # a notebook's globals(): parameters, modules, results; only the field names are taken
    ns = {"epochs": 3, "lr": 0.01, "pd": object(), "best": {}, "extra": {"drop_path": 0.1}}
    cfg = TrainConfig.from_namespace(ns)
    assert (cfg.epochs, cfg.lr, cfg.drop_path) == (3, 0.01, 0.1)
    p = PredictConfig.from_namespace({"images": "i", "csv": "c", "checkpoints": ["x"], "ens": {}},
                                     threshold=0.3)
    assert (p.images, p.threshold, p.agg) == ("i", 0.3, "mean")


def test_paths_are_stored_as_strings(tmp_path):
    cfg = TrainConfig(data=tmp_path, aux=("view",))
    assert cfg.data == str(tmp_path) and cfg.aux == ["view"]
    p = PredictConfig(tmp_path, tmp_path / "t.csv", tmp_path / "b.pt", out=None)
    assert p.checkpoints == [str(tmp_path / "b.pt")] and p.csv == str(tmp_path / "t.csv")


def test_predict_takes_a_config_or_its_fields_in_the_old_order():
    params = list(inspect.signature(predict).parameters)
    assert params == [f.name for f in dataclasses.fields(PredictConfig)]
    assert params[:4] == ["images", "csv", "checkpoints", "out"]
    with pytest.raises(TypeError, match="no further arguments"):
        predict(PredictConfig("i", "c", ["x"]), workers=0)


def test_the_cli_builds_the_configs_from_flags_and_yaml(tmp_path, monkeypatch, capsys):
    import rsna_utils.infer.predict
    import rsna_utils.learn.train
    seen = {}
    monkeypatch.setattr(rsna_utils.learn.train, "train", lambda cfg: seen.setdefault("train", cfg) and {})
    (tmp_path / "t.yaml").write_text("epochs: 5\nema: 0.999\namp: off\nextra: {drop_path: 0.2}\n")
    assert main(["train", "--config", str(tmp_path / "t.yaml"), "--epochs", "2", "--quiet"]) == 0
    cfg = seen["train"]
    assert (cfg.epochs, cfg.ema, cfg.amp, cfg.drop_path, cfg.progress) == (2, 0.999, "off", 0.2, False)
    assert main(["train", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rsna train: error: epochs=0: give an integer >= 1"

    class Result:    # what predict returns, enough for the printed line
        images, warnings, submission, seconds, metrics = [1], [], [1], 1.0, {}

        def counts(self):
            return "0 unreadable"
    monkeypatch.setattr(rsna_utils.infer.predict, "predict",
                        lambda *a, **k: seen.setdefault("predict", (a, k)) and Result())
    ens = tmp_path / "ensemble.json"
    ens.write_text('{"threshold": 0.25, "agg": "max", "binarize": "threshold"}')
    assert main(["predict", "--images", "i", "--csv", "c", "--checkpoints", "b.pt", "--ensemble",
                 str(ens), "--quiet"]) == 0
    args, kwargs = seen["predict"]
    assert not kwargs and len(args) == 1 and isinstance(args[0], PredictConfig)
    p = args[0]
    assert (p.threshold, p.agg, p.binarize_how, p.progress) == (0.25, "max", "threshold", False)


def test_library_warnings_are_one_line_without_paths(capsys, monkeypatch):
    import warnings

    from rsna_utils.app.cli import plain_warnings
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)     # restored after
    plain_warnings("preprocess")
    lib = "/x/.venv/lib/python3.11/site-packages/pydicom/filereader.py"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn_explicit("End of file reached before delimiter\nmore", UserWarning,
                                   lib, 487)
    err = capsys.readouterr().err
    assert err == "rsna preprocess: warning from pydicom: End of file reached before delimiter\n"


def test_a_size_is_one_recipe_however_it_is_spelled(tmp_path):
    """'1024x512' from a plan's YAML and [1024, 512] from --size were two recipes: out-of-fold
    merging and predict split one model into two."""
    from dataclasses import asdict

    from rsna_utils.learn.checkpoint import recipe_key
    a, b = TrainConfig(size="1024x512"), TrainConfig(size=[1024, 512])
    assert a.size == b.size == [1024, 512] and TrainConfig(size=256).size == [256, 256]
    assert recipe_key(asdict(a), tmp_path) == recipe_key(asdict(b), tmp_path)
    old = {**asdict(a), "size": "1024x512"}            # a config.json written before
    assert recipe_key(old, tmp_path) == recipe_key(asdict(b), tmp_path)


def test_where_a_recipe_was_trained_is_not_the_recipe(tmp_path):
    """The same folds trained in a clone and on /kaggle/input were two recipes (their keys held
    the whole data, csv and weights paths): `rsna oof` and predict split one model into two.
    The folders' names still tell two preprocessings apart."""
    from dataclasses import asdict

    from rsna_utils.learn.checkpoint import canonical_recipe, recipe_key
    here = asdict(TrainConfig(data="data/png_roi", csv="data/synthetic/train.csv",
                              pretrained_path="weights/lite0.pth"))
    kaggle = {**here, "data": "/kaggle/input/rsna-pngs/png_roi/", "csv":
              "/kaggle/input/rsna-breast-cancer-detection/train.csv",
              "pretrained_path": "/kaggle/input/w/lite0.pth"}
    assert recipe_key(here, tmp_path) == recipe_key(kaggle, tmp_path)
    assert recipe_key({**here, "data": "data/png_stretch"}, tmp_path) != recipe_key(here, tmp_path)
    assert recipe_key({**here, "pretrained_path": "pypi"}, tmp_path) != recipe_key(here, tmp_path)
    # a key 0.2 wrote (whole paths) reads as this version's, and this version's stays itself
    import json
    old = "config:" + json.dumps({k: v for k, v in kaggle.items() if k not in (
        "fold", "out", "resume", "overwrite", "progress", "workers", "device", "cache")},
        sort_keys=True, default=str)
    assert old != recipe_key(here, tmp_path)[0]
    assert canonical_recipe(old) == recipe_key(here, tmp_path)[0]
    assert canonical_recipe(canonical_recipe(old)) == canonical_recipe(old)
    assert canonical_recipe("folder:r18") == "folder:r18" and canonical_recipe("config:{") == \
        "config:{"


def _entry_points():
    from rsna_utils.infer.oof import OofConfig, write_ensemble
    from rsna_utils.reports.evaluate import EvaluateConfig, evaluate_predictions
    from rsna_utils.reports.exam import ExplainConfig, write_exam_reports
    return [(ExplainConfig, write_exam_reports, ("i", "t.csv", ["b.pt"], "out")),
            (EvaluateConfig, evaluate_predictions, ("p.csv", "out")),
            (OofConfig, write_ensemble, (["run"], "ensemble.json"))]


@pytest.mark.parametrize("cls, fn, args", _entry_points(),
                         ids=lambda x: getattr(x, "__name__", "args"))
def test_run_functions_take_their_defaults_from_their_config(cls, fn, args):
    """`rsna explain`, `rsna evaluate` and `rsna oof` call a function that builds its config:
    no default of a setting is spelled again in the function's signature, where it could drift
    from the flag's."""
    again = {p.name: p.default for p in inspect.signature(fn).parameters.values()
             if p.name in cls.field_names() and p.default not in (inspect.Parameter.empty, None)}
    assert again == {}
    with pytest.raises(RsnaError, match=r"^agg='median': choose mean or max$"):   # the config's
        fn(*args, agg="median")


def test_the_shared_scoring_settings_are_spelled_once():
    """agg, device and the progress bar were declared with their defaults and choices in four
    configs; each config now takes them from core.config."""
    import pathlib
    import re

    import rsna_utils
    root = pathlib.Path(rsna_utils.__file__).parent
    spelled = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if re.search(r'setting\("mean"|choices=\("mean", "max"\)|"auto \| cpu \| cuda"|'
                            r'negate="--quiet"', p.read_text())}
    assert spelled == {"core/config.py"}


# Flags that are not settings: train's YAML of TrainConfig fields and predict's ensemble file,
# which both fill fields; `rsna weights` (export / import of one file) has no config.
NOT_SETTINGS = {("train", "config"), ("predict", "ensemble")}


def test_every_flag_of_every_command_derives_from_a_config_field():
    """`rsna synth`, `preprocess`'s run flags, the plan runner (`notebooks`), `demo`, `ingest`
    and `bundle` spelled their flags by hand, with their own defaults; every flag is now made
    from a config field by `add_flags`."""
    import argparse

    def subcommands(parser):
        return next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices

    by_hand = []
    for name, p in subcommands(build_parser()).items():
        if name == "weights":
            continue
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or (name, action.dest) in NOT_SETTINGS:
                continue
            if not getattr(action, "field", None):
                by_hand.append(f"rsna {name} {action.option_strings or action.dest}")
    assert by_hand == []
