#!/usr/bin/env bash
# One call that proves the GPU path on a CUDA machine (`make gpu-check`), sized for at most 8 minutes
# (127 s on one H200):
#   1. build the kd_lib.ops kernels (python -m kd_lib.ops.build);
#   2. run the GPU tests, every kernel against its reference (pytest -m gpu);
#   3. time the operators (bench/ops.py);
#   4. the student stage's training throughput against an official-style loop (bench/train_throughput.py:
#      ResNet-50 at 224 -> ResNet-18 at 56 px, kd+isrd, bf16 and channels-last against float32).
# Every step writes under bench/results/: gpu-build.log, gpu-tests.xml and gpu-tests.log, ops-cuda.{json,md},
# train-throughput-cuda.{json,md}. It stops at the first step that fails and exits with its status.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=bench/results
mkdir -p "$RESULTS"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device is visible to torch here; run it on a GPU machine" >&2
    exit 2
fi
step() { echo "== $1 ($(date -u +%H:%M:%S))" >&2; }

step "1/4 build the kernels"
"$PYTHON" -m kd_lib.ops.build 2>&1 | tee "$RESULTS/gpu-build.log"
step "2/4 pytest -m gpu"
"$PYTHON" -m pytest -m gpu -q --numprocesses 0 --junitxml "$RESULTS/gpu-tests.xml" 2>&1 | tee "$RESULTS/gpu-tests.log"
step "3/4 bench/ops.py"
"$PYTHON" bench/ops.py
step "4/4 bench/train_throughput.py"
"$PYTHON" bench/train_throughput.py --device cuda
step "done: the figures are under $RESULTS/"
