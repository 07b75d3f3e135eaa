#!/usr/bin/env bash
# GPU check (issue 13), on a GPU machine without network, from the repository root:
#   bash benchmarks/gpu_check.sh STEP [STEP ...]
# steps: setup (install the carried wheels), synth (start the full-size synthetic set in the
# background), probe (the decoders' self-test table), anchors, tests (CUDA tests), exact
# (bit-exactness + corrupt batches), bench (throughput table), all (every step in order).
#
# Prepare on the development machine (Python 3.12 wheels; the folders are .gitignore'd):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 -d wheels \
#       pydicom==3.0.2 dicomsdl==0.109.4 imagecodecs==2026.3.6 nvidia-nvimgcodec-cu13==0.9.0.20 \
#       nvidia-nvjpeg nvidia-nvjpeg2k-cu13
#   DALI (199 MB) is over one call's 64 MiB: `split -b 50000000 -d` its wheel into
#   wheels_dali1..4/part0N (+ a NAME file), one folder carried per call to the same warm machine;
#   `setup` joins them. DALI also needs (pure-Python or small wheels; the H200 image lacks them):
#   optree gast astunparse makefun nvtx libcst nvidia-libnvcomp-cu13==5.3.0.16 (put them in
#   wheels_x/, carried with one of the DALI parts). Real files: copy the J2KR/J2KI/JPLL/JPLY files of
#   ../shared/testdata/nema_wg04_cr into wheels_testdata/nema_wg04_cr/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu_out}
DATA=${DATA:-data/bench_gpu}
PATIENTS=${PATIENTS:-64}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD"
export LD_LIBRARY_PATH="$(ls -d $SITE/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export RSNA_TESTDATA="$PWD/wheels_testdata"

step_setup() {
    # ONE pip command for every wheel: `pip install --target --upgrade` replaces a whole
    # top-level folder, so a second install into nvidia/ wiped the first (seen on the H200)
    local dali=()
    if [ "$(ls wheels_dali*/part* 2>/dev/null | wc -l)" = 4 ]; then
        mkdir -p /tmp/dali && cat wheels_dali*/part* > "/tmp/dali/$(cat wheels_dali1/NAME)"
    fi
    ls /tmp/dali/*.whl >/dev/null 2>&1 && dali=(/tmp/dali/*.whl)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade \
        "${dali[@]}" wheels*/*.whl 2>&1 | grep -v "already exists" | tail -3
    export LD_LIBRARY_PATH="$(ls -d $SITE/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
    python3 -c "from rsna_utils.dicom.decoders import gpu_batch; print({b: gpu_batch.package_available(b) for b in gpu_batch.GPU_BACKENDS})"
    python3 -c "import nvidia.dali" 2>&1 | tail -1
}

step_synth() {   # in its own session: it goes on between calls to the same machine
    if [ ! -f "$DATA/train.csv" ]; then
        setsid nohup python3 -c "from rsna_utils.sources.synth import synthesize; synthesize('$DATA', patients=$PATIENTS, seed=2, size='full', test_patients=0, workers=14, progress=False); print('synth done')" > /tmp/synth.log 2>&1 < /dev/null &
        echo "synth started ($PATIENTS patients, full size)"
    fi
}

wait_synth() {
    for _ in $(seq 300); do [ -f "$DATA/train.csv" ] && return 0; sleep 1; done
    echo "synthetic set not ready"; cat /tmp/synth.log; return 1
}

step_probe() {
    python3 - <<'EOF'

from rsna_utils.dicom.decoders import gpu_batch
for b in gpu_batch.GPU_BACKENDS:
    if not gpu_batch.package_available(b):
        print(b, "not installed"); continue
    r = gpu_batch.make_decoder(b, "cuda").rules
    for syn in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"):
        for kind in (("jp2", "j2k") if syn.endswith(("90", "91")) else ("jpeg",)):
            print(b, syn[-4:], kind, {p: r.mode(syn, kind, p) for p in (8, 10, 12, 14, 15, 16)})
EOF
}

step_anchors() {
    wait_synth || return 1
    mkdir -p /tmp/anchors/.dev/devdata
    ls "$DATA"/train_images/*/*.dcm | head -2 | xargs -I{} cp {} /tmp/anchors/.dev/devdata/
    (cd /tmp/anchors && timeout 240 python3 "$OLDPWD/wheels_testdata/gpu_anchors.py" > "$OUT/anchors.log" 2>&1; tail -25 "$OUT/anchors.log")
}

step_tests() {
    timeout 300 python3 -m pytest -q -x -m cuda tests/dicom/test_gpu.py tests/image/test_inverted.py -p no:cacheprovider 2>&1 | tail -15
}

step_exact() {
    wait_synth || return 1
    timeout 300 python3 benchmarks/gpu_exact.py "$DATA/train_images" wheels_testdata --json "$OUT/exact.json" 2>&1 | tee "$OUT/exact.log" | tail -40
}

step_bench() {
    wait_synth || return 1
    timeout 420 python3 benchmarks/gpu_bench.py --data "$DATA" 2>&1 | tee "$OUT/bench.log" | tail -25
}

[ $# -eq 0 ] && set -- all
for s in "$@"; do
    if [ "$s" = all ]; then
        for t in setup synth tests exact bench; do echo "== $t"; "step_$t"; done
    else
        echo "== $s"; "step_$s"
    fi
done
