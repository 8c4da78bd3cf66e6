#!/usr/bin/env bash
# One command for a GPU machine: install, GPU tests, kernel and training benchmarks.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Runs from the repository root (any cwd). Every step tees its log into OUTDIR and
# runs under a share of one overall deadline (GPU_CHECK_BUDGET_S, default 480 s, so
# the whole check ends inside 9 minutes, set-up included); steps run in the order of
# what matters most (install, correctness, tuning, training throughput, the training
# check, kernel benchmarks), so a short lease still gets the first answers; a failed or timed-out step does not stop
# the next one, but the script exits non-zero at the end if any step failed. The
# benchmarks write their JSON into OUTDIR (conv.py after every layer, so a run cut
# by its time limit keeps the rows it measured). A short table prints last.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START_S=$(date +%s)
SUMMARY="$OUTDIR/summary.tsv"
: > "$SUMMARY"
FAILED=0

# run_step NAME MAX_SECONDS COMMAND...: log to OUTDIR/NAME.log, record status and time.
run_step() {
    local name=$1 max_s=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START_S)))
    local limit=$((max_s < left ? max_s : left))
    if [ "$limit" -lt 10 ]; then
        printf '%s\tSKIPPED\t0\tno time left of the %ss budget\n' "$name" "$BUDGET_S" >> "$SUMMARY"
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee "$OUTDIR/$name.log"
    local step_start rc
    step_start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUTDIR/$name.log"
    rc=$?
    local took=$(($(date +%s) - step_start))
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMEOUT"
        FAILED=1
    elif [ $rc -ne 0 ]; then
        status="FAILED(rc=$rc)"
        FAILED=1
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$(tail -n 1 "$OUTDIR/$name.log" | cut -c1-100)" \
        >> "$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    $PYTHON -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>&1
} | tee "$OUTDIR/environment.log"

# The GPU machine has no network: the pinned CUTLASS headers travel as a wheel in .whl/
# (pip download --no-deps -d .whl nvidia-cutlass==VERSION, then carry .whl).
if compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null; then
    run_step cutlass_wheel 60 $PYTHON -m pip install --no-deps .whl/nvidia_cutlass-*.whl
fi
# Build the extension for this GPU's architecture only, with every core: the default
# (sm_80 + sm_90, 2 jobs) takes minutes on 2 cores (docs/cuda.md).
ARCH=$($PYTHON -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null)
run_step install 180 env ANFAST_CUDA_ARCHS="${ARCH:-80;90}" MAX_JOBS="$(nproc)" \
    $PYTHON -m pip install --no-deps --no-build-isolation -e .
# Correctness first: every fused backend vs float64 on every ResNet-50 conv (bf16 / fp32,
# channels_last / NCHW, forward and every gradient), then the CUDA kernels' own tests.
run_step resnet50_correctness 120 $PYTHON -m pytest -q -rs tests/test_gpu_resnet50.py
run_step cuda_tests 90 $PYTHON -m pytest -q tests/test_cuda_ext.py
# Auto's measured choice for ResNet-50 training (verify + time every conv against
# torch); the cache stays in OUTDIR, filled key by key even if the step times out.
run_step tune_resnet50 150 env ANFAST_CACHE_DIR="$OUTDIR/cache" $PYTHON -m anfast tune \
    --arch resnet50 --alpha 4 --policy paper --batch-size 256 --image-size 224 --amp bf16 \
    --channels-last --device cuda --out "$OUTDIR/tune-resnet50.json"
# Training img/s on synthetic data: plain vs AN (auto, with the decisions just cached)
# vs AN (torch) vs the authors' masked student, side by side; --out is a directory.
run_step train_bench 120 env ANFAST_CACHE_DIR="$OUTDIR/cache" $PYTHON benchmarks/train_throughput.py \
    --device cuda --arch resnet50 --image-size 224 --batch-size 256 --compile off --out "$OUTDIR"
# The quickstart's training on this GPU (bf16, channels_last) and a SIGTERM + resume.
run_step train_check 120 env ANFAST_CACHE_DIR="$OUTDIR/cache" $PYTHON benchmarks/train_check.py \
    --device cuda --out "$OUTDIR/train_check" -- --amp bf16 --channels-last
run_step conv_bench 150 $PYTHON benchmarks/conv.py --out "$OUTDIR/conv.json"
run_step gpu_tests 90 $PYTHON -m pytest -q -m gpu tests/ --ignore=tests/test_cuda_ext.py \
    --ignore=tests/test_gpu_resnet50.py
# With what is left: the same throughput under torch.compile, then the interpreter-sized
# random shapes of the Triton tests, now compiled for the GPU.
run_step train_bench_compile 150 env ANFAST_CACHE_DIR="$OUTDIR/cache" $PYTHON \
    benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 --batch-size 256 \
    --compile default,reduce-overhead --out "$OUTDIR/compiled"
run_step triton_tests 100 $PYTHON -m pytest -q -m "not slow and not gpu" tests/test_triton_conv.py

echo
echo "gpu_check: $(($(date +%s) - START_S)) s in all, logs and JSON in $OUTDIR"
printf '%-14s %-14s %6s  %s\n' step status sec "last line of log"
while IFS=$'\t' read -r name status took last; do
    printf '%-14s %-14s %6s  %s\n' "$name" "$status" "$took" "$last"
done < "$SUMMARY"
exit $FAILED
