#!/usr/bin/env bash
# One command for a GPU machine: install, GPU correctness, tuning and training benchmarks.
#
#   bash benchmarks/gpu_check.sh OUTDIR [STEP ...]
#   GPU_CHECK_PACK=DIR bash benchmarks/gpu_check.sh OUTDIR     # also pack the results into DIR
#
# Rehearse it on a machine without a GPU before a lease (tests/test_benchmark_tools.py
# does): every command line is checked by its own parser, every pytest step collects:
#
#   PYTHON="python benchmarks/dry_python.py" NCU=/none bash benchmarks/gpu_check.sh /tmp/dry \
#       engine_correct cuda_correct step_engine tune train_bench census ...
#
# Runs from the repository root (any cwd). Every step tees its log into OUTDIR and runs
# under its own time limit and a share of one overall deadline (GPU_CHECK_BUDGET_S,
# default 540 s), so a short lease still gets the first answers; a failed or timed-out
# step does not stop the next one, and the exit status is non-zero if any step failed.
# The order is this round's (issue 27): correctness of what is new, then the step engine,
# the tune with every backend, then what earlier leases left unmeasured. STEPs (default:
# all, in this order):
#
#   install        the extension for this GPU's arch only, in the background, while
#   engine_correct the GPU tests of the step engine (two streams vs one, a captured step
#                  vs eager steps) and the gemm backend, which need no extension
#   cuda_correct   the CUDA backend (every tile variant) on every distinct ResNet-50 conv
#                  vs float64, and tests/test_cuda_ext.py
#   step_engine    training img/s, plain vs AN (torch backend; and its students on their
#                  own streams), eager / torch.compile / whole-step CUDA graphs, one process
#   tune           `anfast tune` ResNet-50, bs 256, bf16, channels_last (verify + time;
#                  backends $TUNE_BACKENDS, default gemm,cuda), each layer's winner and variant
#   train_bench    plain vs AN auto (the decisions just tuned, torch ones pinned), eager /
#                  compiled / CUDA graphs
#   census         kernel launches per step (torch.profiler), plain vs AN, eager and compiled
#   triton_correct the Triton backend on every distinct ResNet-50 conv (the cases earlier
#                  leases never reached; pytest-xdist spreads the kernel compiles)
#   conv_bench     benchmarks/conv.py --quick: fused vs two cuDNN convs on 4 layers, per
#                  phase (forward, dgrad, wgrad)
#   search_bench   a DAN search step's img/s (train_throughput.py's dan provider) against
#                  plain and AN training, eager and compiled
#   train_check    the built-in-set training (bf16, channels_last, the CUDA backend) and
#                  a SIGTERM / --resume run
#   ncu            Nsight Compute on each fused backend's slowest layer (picked from the
#                  tune results) and on cuDNN's kernels for that layer
#   tune_triton    `anfast tune` of the Triton backend on the 3x3 convs (own cache)
#   gpu_tests      the remaining `pytest -m gpu` tests
#
# Triton's kernel cache is TRITON_CACHE_DIR (default /tmp/anfast-triton: an absolute
# path that is the same on every machine, since Triton's cache index holds absolute
# paths); with GPU_CHECK_PACK it travels back as triton-cache.tgz, and a later call that
# carries it in .gpu/ compiles only what is new. Kernel objects in .gpu/kernels/
# (ANFAST_PREBUILT_KERNELS in setup.py) save the extension's device-code build. The
# commit recorded is ANFAST_COMMIT when set (the device's copy of .git may be stale).
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [STEP ...]" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
ALL_STEPS="install engine_correct cuda_correct step_engine tune train_bench census triton_correct conv_bench search_bench train_check ncu tune_triton gpu_tests"
STEPS=${*:-$ALL_STEPS}
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
START_S=$(date +%s)
SUMMARY="$OUTDIR/summary.tsv"
: > "$SUMMARY"
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export ANFAST_CACHE_DIR="$OUTDIR/cache" ANFAST_GPU_CORRECTNESS_LOG="$OUTDIR/correctness.jsonl"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/anfast-triton} TRITON_STORE_BINARY_ONLY=1
NPROC=$(nproc)

wants() { [[ " $STEPS " == *" $1 "* ]]; }
left_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

record() {  # record NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "$4" | tr '\t\n' '  ' | cut -c1-110)" >> "$SUMMARY"
    case $2 in ok) ;; *) FAILED=1 ;; esac
}

# run_step NAME MAX_SECONDS COMMAND...: log to OUTDIR/NAME.log, record status and time.
run_step() {
    start_step "$@" && finish_step "$1"
}

# start_step NAME MAX_SECONDS COMMAND...: the same in the background (finish_step NAME
# waits for it); for steps that time nothing, beside another such step.
start_step() {
    local name=$1 max_s=$2
    shift 2
    local left
    left=$(left_s)
    local limit=$((max_s < left ? max_s : left))
    if [ "$limit" -lt 15 ]; then
        record "$name" SKIPPED 0 "no time left of the ${BUDGET_S}s budget"
        return 1
    fi
    echo "=== $name (limit ${limit}s): $*" | tee "$OUTDIR/$name.log"
    (
        s=$(date +%s)
        timeout --kill-after=10 "$limit" "$@" >> "$OUTDIR/$name.log" 2>&1
        echo "$? $(($(date +%s) - s))" > "$OUTDIR/$name.rc"
    ) &
    echo $! > "$OUTDIR/$name.pid"
}

finish_step() {
    local name=$1 rc took status=ok
    [ -f "$OUTDIR/$name.pid" ] || return 0
    wait "$(cat "$OUTDIR/$name.pid")"
    rm -f "$OUTDIR/$name.pid"
    read -r rc took < "$OUTDIR/$name.rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=TIMEOUT
    elif [ "$rc" -ne 0 ]; then
        status="FAILED(rc=$rc)"
    fi
    tail -n 25 "$OUTDIR/$name.log"
    record "$name" "$status" "$took" "$(grep -v '^\s*$' "$OUTDIR/$name.log" | tail -n 1)"
}

pack() {  # the results as at most 8 flat files (what a device call brings back)
    [ -n "${GPU_CHECK_PACK:-}" ] || return 0
    mkdir -p "$GPU_CHECK_PACK"
    cp "$SUMMARY" "$GPU_CHECK_PACK/summary.tsv"
    tar czf "$GPU_CHECK_PACK/gpu_check.tgz" -C "$OUTDIR" --exclude=./train_check/uninterrupted \
        --exclude=./train_check/resumed . 2>/dev/null
    tar czf "$GPU_CHECK_PACK/triton-cache.tgz" -C / "${TRITON_CACHE_DIR#/}" 2>/dev/null
    local f  # a device call brings back files of at most 16 MiB
    for f in "$GPU_CHECK_PACK"/*.tgz; do
        if [ "$(stat -c %s "$f")" -gt $((16 * 1024 * 1024 - 4096)) ]; then
            echo "gpu_check: $f is over 16 MiB, left out"; rm -f "$f"
        fi
    done
    ls -la "$GPU_CHECK_PACK"
}

$PYTHON benchmarks/common.py --device cuda --out "$OUTDIR/environment.json" 2>&1 | tee "$OUTDIR/environment.log"
# pytest-xdist spreads the GPU tests over processes (each with few CPU threads; the
# correctness cases report themselves in correctness.jsonl as they finish). A worker
# whose test broke the CUDA context ends itself (tests/conftest.py) and xdist starts
# another, as often as a faulting kernel variant needs (xdist's default allows 4 per
# worker). pytest-timeout fails a test past 60 s and prints its stacks; under xdist with
# the thread method, which also ends a worker hung inside a CUDA call (a signal never
# gets back to Python there), while a plain run keeps the signal method (the thread
# method would end the whole session).
PYTEST=($PYTHON -m pytest -q -rs -p no:cacheprovider -p no:benchmark)
XDIST=()
if $PYTHON -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$((NPROC > 12 ? 12 : NPROC))" --max-worker-restart=1000)
fi
if $PYTHON -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout=60)
    [ ${#XDIST[@]} -gt 0 ] && XDIST+=(--timeout-method=thread)
fi

# A previous call's Triton kernel cache, carried in .gpu/ (see the header).
if [ -f .gpu/triton-cache.tgz ]; then
    tar xzf .gpu/triton-cache.tgz -C / && echo "gpu_check: Triton cache restored into $TRITON_CACHE_DIR"
fi

if wants install; then
    # The GPU machine has no network: the pinned CUTLASS headers travel as a wheel in .whl/.
    if compgen -G ".whl/nvidia_cutlass-*.whl" >/dev/null; then
        $PYTHON -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > "$OUTDIR/cutlass_wheel.log" 2>&1 \
            || record cutlass_wheel FAILED 0 "$(tail -n 1 "$OUTDIR/cutlass_wheel.log")"
    fi
    ARCH=$($PYTHON -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')")
    # Kernel objects compiled elsewhere by the same nvcc for this arch (setup.py's
    # ANFAST_PREBUILT_KERNELS): only the bindings compile here.
    PREBUILT=""
    compgen -G ".gpu/kernels/*.o" >/dev/null && PREBUILT="$REPO/.gpu/kernels"
    export ARCH NPROC PYTHON PREBUILT
    install_extension() {  # for this GPU's arch only, with every core; a full build if needed
        local pip_e=($PYTHON -m pip install -q --no-deps --no-build-isolation -e .)
        if [ -n "$PREBUILT" ] && env ANFAST_PREBUILT_KERNELS="$PREBUILT" ANFAST_CUDA_ARCHS="$ARCH" \
                "${pip_e[@]}" && $PYTHON -c "import anfast._C"; then
            echo "gpu_check: installed with the prebuilt kernels of $PREBUILT"
            return 0
        fi
        [ -n "$PREBUILT" ] && echo "gpu_check: the prebuilt kernels did not link or load: a full build"
        env ANFAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$NPROC" "${pip_e[@]}" && $PYTHON -c "import anfast._C" \
            && echo "gpu_check: installed, extension built here"
    }
    export -f install_extension
    # The build runs beside the engine step (engine_correct), which needs no extension.
    start_step install 240 bash -c install_extension
fi

# Correctness first. The step engine and the gemm backend need no extension: they run
# beside its build. Then each fused backend through the public op on every distinct
# ResNet-50 conv (bf16 / fp32, channels_last / NCHW, outputs and every gradient vs float64).
wants engine_correct && run_step engine_correct 90 env OMP_NUM_THREADS=2 "${PYTEST[@]}" \
    -m gpu tests/test_streams.py tests/test_cuda_graphs.py tests/test_gemm_backend.py
finish_step install
# 856 cases now (every tile variant and the sm_90a kernels); 360 took 26 s on 12 processes
# (2026-11-27), so 150 s leaves room for a slow start without cutting the step's answers.
wants cuda_correct && run_step cuda_correct 150 env OMP_NUM_THREADS=2 "${PYTEST[@]}" \
    "${XDIST[@]}" -k "cuda or gemm" tests/test_gpu_resnet50.py tests/test_cuda_ext.py
# Step 2's JSON as soon as its cases are in (triton_correct adds its own to it later).
report_correctness() {  # report_correctness NAME: correctness.jsonl so far, as one JSON
    run_step "$1" 30 $PYTHON benchmarks/correctness_report.py "$OUTDIR/correctness.jsonl" \
        --out "$OUTDIR/correctness-resnet50.json"
}
wants cuda_correct && report_correctness correctness_report

# The AN step against the plain step, eager, compiled and as one CUDA graph, side by side in
# one process (issue 23's targets: AN compiled / plain compiled >= 0.62, AN >= 4000 img/s).
# The torch backend is what auto chose on every conv so far; inductor's own Triton kernels
# go to a cache of their own, so anfast's travels back whole.
wants step_engine && run_step step_engine 240 env TRITON_CACHE_DIR=/tmp/inductor-triton \
    $PYTHON benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 \
    --batch-size 256 --providers base,anfast_torch,anfast_streams --compile off,default,graphs \
    --rounds 3 --steps 4 --out "$OUTDIR/step_engine"

# Auto's measured choice for ResNet-50 training: every conv verified against float64 and
# timed (fwd + bwd) against torch, per backend and kernel variant; the cache fills key by
# key even if the step times out.
TUNE=($PYTHON -m anfast tune --arch resnet50 --alpha 4 --policy paper --batch-size 256 --image-size 224
      --amp bf16 --channels-last --device cuda)
wants tune && run_step tune 180 "${TUNE[@]}" --backends "${TUNE_BACKENDS:-gemm,cuda}" \
    --out "$OUTDIR/tune-resnet50.json"

# Training img/s with auto's decisions just cached (ANFAST_TUNE=0: nothing is timed inside
# the timing; an undecided conv runs torch), the convs decided for torch pinned to it.
wants train_bench && run_step train_bench 200 env ANFAST_TUNE=0 TRITON_CACHE_DIR=/tmp/inductor-triton \
    $PYTHON benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 \
    --batch-size 256 --providers base,anfast --compile off,default,graphs --rounds 3 --steps 4 \
    --out "$OUTDIR"
# What one step launches: plain vs AN, eager and compiled (torch.profiler on the device).
wants census && run_step census 120 env TRITON_CACHE_DIR=/tmp/inductor-triton $PYTHON \
    benchmarks/step_census.py --providers base,anfast_torch --launches --device cuda \
    --launch-batch-size 64 --out "$OUTDIR"

wants triton_correct && run_step triton_correct 90 env OMP_NUM_THREADS=2 "${PYTEST[@]}" \
    "${XDIST[@]}" -k triton tests/test_gpu_resnet50.py
wants triton_correct && report_correctness correctness_report_triton

# Where the fused kernels lose: per phase (forward, dgrad, wgrad) on 4 layers, including
# each backend's slowest (layer1's 3x3 for CUDA C++, layer3.0.conv2 for Triton).
wants conv_bench && run_step conv_bench 90 $PYTHON benchmarks/conv.py --quick --no-compiled \
    --out "$OUTDIR/conv.json"

# What a DAN search step costs (`anfast search`: the full-width student masked by its
# gates, the cost penalty, the logits' Adam) against plain and AN training steps.
wants search_bench && run_step search_bench 120 env TRITON_CACHE_DIR=/tmp/inductor-triton \
    $PYTHON benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 \
    --batch-size 256 --providers base,anfast_torch,dan --compile off,default --rounds 3 --steps 4 \
    --out "$OUTDIR/search_bench"

# The quickstart's training on this GPU (bf16, channels_last, the CUDA backend) and a
# SIGTERM + resume.
wants train_check && run_step train_check 110 $PYTHON benchmarks/train_check.py --device cuda \
    --workers 4 --out "$OUTDIR/train_check" -- --amp bf16 --channels-last --backend cuda

# Nsight Compute on each fused backend's slowest layer and on cuDNN's kernels for it:
# one `ncu` run per provider and layer, its report read back as CSV, then one JSON.
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
export NCU OUTDIR PYTHON
ncu_profiles() {
    local picks backend layer ratio provider report csvs=()
    picks=$($PYTHON benchmarks/ncu_layer.py pick "$OUTDIR/tune-resnet50.json" \
        benchmarks/results/tune-resnet50-*.json) || return 1
    echo "slowest layer per fused backend (time / torch's):"
    echo "$picks"
    while read -r backend layer ratio; do
        for provider in "fused-$backend" cudnn-x2; do
            report="$OUTDIR/ncu-$provider-$layer"
            [ -f "$report.csv" ] && continue  # cuDNN once per layer
            "$NCU" --profile-from-start off --clock-control none --force-overwrite \
                --section SpeedOfLight --section LaunchStats --section Occupancy \
                --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
                --section WarpStateStats --export "$report" \
                $PYTHON benchmarks/ncu_layer.py run --layer "$layer" --provider "$provider" \
                || { echo "gpu_check: ncu failed on $provider $layer"; continue; }
            "$NCU" --import "$report.ncu-rep" --csv --page details > "$report.csv" || continue
            csvs+=("$report.csv")
            # After every report, so a step cut short by its limit keeps what it profiled.
            $PYTHON benchmarks/ncu_layer.py summarize "${csvs[@]}" --out "$OUTDIR/ncu.json" \
                $([ -f "$OUTDIR/environment.json" ] && echo --environment "$OUTDIR/environment.json") \
                > "$OUTDIR/ncu-summary.txt" || return 1
        done
    done <<< "$picks"
    cat "$OUTDIR/ncu-summary.txt"
}
export -f ncu_profiles
if wants ncu; then
    if [ -x "$NCU" ] || command -v "$NCU" >/dev/null; then
        run_step ncu 150 bash -c ncu_profiles
    else
        record ncu SKIPPED 0 "no ncu found (set NCU=/path/to/ncu)"
    fi
fi

# Triton on ResNet-50's 3x3 convs alone, in a cache of its own: each Triton kernel config
# compiles in seconds on the device's CPU, so a first tune of all 23 convs with three
# configs of three kernels each does not fit a short lease.
wants tune_triton && run_step tune_triton 150 env ANFAST_CACHE_DIR="$OUTDIR/cache-triton" "${TUNE[@]}" \
    --backends triton --layers '*conv2' --out "$OUTDIR/tune-resnet50-triton-conv2.json"
wants gpu_tests && run_step gpu_tests 90 env OMP_NUM_THREADS=2 "${PYTEST[@]}" "${XDIST[@]}" \
    -m gpu tests/ --ignore=tests/test_cuda_ext.py --ignore=tests/test_gpu_resnet50.py

echo
echo "gpu_check: $(($(date +%s) - START_S)) s in all, logs and JSON in $OUTDIR"
pack
printf '%-15s %-14s %5s  %s\n' step status sec "last line of its log"
while IFS=$'\t' read -r name status took last; do
    printf '%-15s %-14s %5s  %s\n' "$name" "$status" "$took" "$last"
done < "$SUMMARY"
exit $FAILED
