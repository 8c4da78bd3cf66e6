#!/usr/bin/env bash
# Compile the CUDA extension's device code on this machine for a GPU machine's lease:
#
#   bash benchmarks/prebuild_kernels.sh [ARCHS]      # default 90 (H100 / H200)
#
# Writes .gpu/kernels/adjoined_conv_{fprop,dgrad,wgrad}.o, and adjoined_conv_sm90a.o with 90 in
# ARCHS (the CUTLASS 3 kernels, sm_90a only; kernels/*.cu include no torch,
# so they do not depend on the torch version there). Carry .gpu to the GPU machine:
# benchmarks/gpu_check.sh then installs with ANFAST_PREBUILT_KERNELS and compiles only
# the bindings (49 s on the H200 machine instead of 172 s). Use the nvcc the GPU machine
# has (13.0 on this project's machines) and its arch.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${1:-90}
PYTHON=${PYTHON:-python}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
ANFAST_CUDA_ARCHS="$ARCHS" MAX_JOBS="${MAX_JOBS:-2}" $PYTHON setup.py -q build_ext \
    --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
mkdir -p .gpu/kernels
cp "$BUILD"/temp/kernels/adjoined_conv_*.o .gpu/kernels/
# setup.py links these objects only into a tree with the same kernel sources and archs.
$PYTHON kernels/sources_digest.py "$ARCHS" > .gpu/kernels/SOURCES.sha256
ls -la .gpu/kernels
