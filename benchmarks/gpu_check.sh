#!/usr/bin/env bash
# GPU check (issue 4): install what the GPU machine lacks from local wheels, run the CUDA tests,
# the anchors and the GPU benchmark, and print a short table last.
#
# Prepare on the development machine (Python 3.12 wheels for the GPU box, which has no network):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d wheels \
#       pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg dicomsdl imagecodecs \
#       "nvidia-nvimgcodec-cu13[all]" nvidia-nvjpeg2k-cu13 nvidia-nvjpeg nvidia-libnvcomp-cu13 \
#       nvidia-nvtiff-cu13 papermill safetensors
#   cp ../shared/tools/gpu_anchors.py wheels/
#   DALI (199 MB) is over one call's 64 MiB: `split -b 50000000` its wheel into wheels_dali1..4/
#   (each .gitignore'd), carry one folder per call to the same warm machine, then this script
#   joins them: cat wheels_dali*/part* > wheels/nvidia_dali_cuda130-....whl
# Run on the GPU machine from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ls wheels_dali*/part* >/dev/null 2>&1; then
    name=$(cat wheels_dali*/NAME 2>/dev/null || echo nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl)
    cat wheels_dali*/part* > "wheels/$name"
fi
python -m pip install --no-index --no-deps -q wheels/*.whl
python -m pip install --no-deps -q --no-build-isolation -e . || python -m pip install --no-deps -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m cuda tests/test_gpu.py -p no:cacheprovider || echo "CUDA TESTS FAILED"
python -m pytest -q tests/test_gpu.py tests/test_voi.py tests/test_dicom_io.py -p no:cacheprovider || echo "CPU TESTS FAILED"
if [ -f wheels/gpu_anchors.py ]; then python wheels/gpu_anchors.py || echo "anchors failed"; fi
python benchmarks/gpu_bench.py --patients "${PATIENTS:-16}"
