"""The settings of the commands whose step has no config of its own: the preprocessing run
(`rsna preprocess`: where from, where to, how many processes; the kernel's settings are
`PreprocessConfig`), the plan runner (`rsna notebooks`), the demo (`rsna demo`), `rsna ingest`
and `rsna bundle`. Their flags derive from these fields (`core.config`), as every step's do."""
from __future__ import annotations

from dataclasses import dataclass

from rsna_utils.core.config import Config, backend_setting, progress_setting, setting
from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.kaggle import KAGGLE_EXTERNAL, KAGGLE_WEIGHTS
from rsna_utils.sources.ingest import FORMATS

GPUS = ("h100", "h200", "t4", "t4x2")


@dataclass
class PreprocessRunConfig(Config):
    """`rsna preprocess`: a DICOM folder to PNGs (the kernel's settings: `PreprocessConfig`)."""

    KIND = "preprocessing run"

    images: str = setting(help="folder of {patient_id}/{image_id}.dcm")
    out: str = setting(help="output folder (PNGs, meta.csv, failures.csv)")
    csv: str | None = setting(None, "train.csv / test.csv (default: scan --images)")
    backend: str = backend_setting("auto (a GPU backend when CUDA and the package are present), "
                                   "imagecodecs, dicomsdl, pydicom, nvimgcodec, dali")
    workers: int | None = setting(None, "processes (default: all cores)", ge=0)
    batch_size: int = setting(32, "GPU decode batch", ge=1)
    shard: str | None = setting(None, "K/N: process shard K (from 0) of N")
    progress: bool = progress_setting()


@dataclass
class PlanConfig(Config):
    """What every plan run takes: the plan, the data, where the runs go, the weights, the
    parameters overridden by hand."""

    KIND = "plan"

    plan: str = setting("demo", "demo, kaggle, submit, or a plan YAML path")
    data: str = setting("data/synthetic", "dataset folder ({data} in the plan)")
    runs: str = setting("runs", "executed notebooks (and the report) go to RUNS/<plan name>/")
    weights: str = setting(KAGGLE_WEIGHTS, "folder of pretrained weights, one sub-folder per "
                           "model (`rsna weights export --out DIR/MODEL`): {weights} in the plan "
                           f"(default: {KAGGLE_WEIGHTS}, the Kaggle dataset)")
    param: list = setting([], "override a parameter: key=value (all steps) or step.key=value",
                          flags=("-p",), repeat=True)
    progress: bool = progress_setting("progress bars")

    def __post_init__(self):
        self.check_fields()


@dataclass
class PlanRunConfig(PlanConfig):
    """`rsna notebooks`: a plan run headless, or its estimate (`--estimate`, `--calibrate`)."""

    name: str | None = setting(None, "run name (default: the plan's)")
    variant: str | None = setting(None, "a named variant of the plan (its `variants:`, e.g. the "
                                  "kaggle plan's 12h)")
    external: str = setting(KAGGLE_EXTERNAL, "folder of public sources ingested by `rsna "
                            "ingest`, one sub-folder each: {external} in the plan (default: "
                            f"{KAGGLE_EXTERNAL}); a missing one is skipped with one line")
    require_sources: bool = setting(False, "stop when a source folder of the plan is missing, "
                                    "instead of training without it")
    estimate: bool = setting(False, "run nothing: print each step's images, batches, expected "
                             "hours on one GPU and training memory per batch")
    gpu: str = setting("h100", "with --estimate: the GPU to estimate for; t4x2: Kaggle's two "
                       "T4s, the submit plan's test patients split over both (shards: auto), "
                       "training on one", choices=GPUS)
    budget_hours: float | None = setting(None, "with --estimate: refuse a plan longer than this "
                                         "(default: the plan's budget_hours)", gt=0)
    calibrate: bool = setting(False, "run nothing of the plan: time the first steps of each "
                              "training step's model here (random input on the device) and "
                              "print the estimate from those measured rates")
    calibrate_steps: int = setting(200, "with --calibrate: timed optimiser steps per model",
                                   ge=1)

    def where(self) -> dict:
        """The keywords `run_plan`, `estimate_plan` and `calibrate_plan` share."""
        return dict(runs=self.runs, name=self.name, overrides=self.param, weights=self.weights,
                    variant=self.variant, external=self.external,
                    require_sources=self.require_sources)


@dataclass
class DemoConfig(PlanConfig):
    """`rsna demo` (make demo): a synthetic dataset when DATA has none, then the demo plan."""

    KIND = "demo"

    data: str = setting("data/synthetic", "the dataset folder: generated there when it has no "
                        "train.csv")
    plan: str = setting("demo", "the plan to run on it (another plan needs a DATA with a "
                        "train.csv)")
    patients: int = setting(60, "synthetic train patients, about 4 images each", ge=1)
    positive_rate: float = setting(0.3, "share of synthetic patients with cancer, raised from "
                                   "the real 2% so the small validation split has positives",
                                   ge=0, le=1)


@dataclass
class IngestConfig(Config):
    """`rsna ingest`: a public dataset in the RSNA shape, or several such folders joined."""

    KIND = "ingest"

    out: str = setting(help="output folder (replaced; train.csv, train_images/, id_map.csv, "
                       "unmapped.csv, ingest.json)")
    format: str | None = setting(None, "the source's layout", choices=tuple(FORMATS))
    src: str | None = setting(None, "the dataset's folder as its publisher lays it out")
    meta: str | None = setting(None, "the source's tables (a file or folder) when they are not "
                               "in --src (default: look in --src)")
    combine: list | None = setting(None, "instead: join these ingested or RSNA-shaped folders "
                                   "into --out (colliding image or patient ids are refused)",
                                   metavar="DIR")
    progress: bool = progress_setting()

    def __post_init__(self):
        self.check_fields()
        if self.combine and (self.format or self.src or self.meta):
            raise RsnaError("--combine takes no --format, --src or --meta: it joins folders that "
                            "`rsna ingest` (or the competition) already made")
        if not self.combine and not (self.format and self.src):
            raise RsnaError("rsna ingest needs --format and --src (or --combine DIR DIR ...)")


@dataclass
class BundleConfig(Config):
    """`rsna bundle`: the offline Kaggle bundle."""

    KIND = "bundle"

    out: str = setting("dist/rsna-bundle", "output folder: new, empty or an earlier bundle, "
                       "which is replaced (another folder is refused)")
    gpu_decoders: str = setting("none", "also carry nvImageCodec for this CUDA (cu12: Kaggle's "
                                "T4/P100 image), installed by install.py where it can be; the "
                                "submit plan then decodes on the GPU once its probe passes",
                                choices=("none", "cu12", "cu13"))
    onnx_gpu: str = setting("none", "also carry onnxruntime-gpu for this CUDA (cu12: Kaggle's "
                            "image), which install.py puts in onnxruntime's place, or puts "
                            "onnxruntime back; for `-p runtime=onnx` on the GPU",
                            choices=("none", "cu12", "cu13"))
    tensorrt: bool = setting(False, "with --onnx-gpu: also carry TensorRT 10's libraries (from "
                             "NVIDIA's index, pypi.nvidia.com), for `-p runtime=tensorrt`")
