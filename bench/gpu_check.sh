#!/usr/bin/env bash
# The one script run on a lent GPU machine (issue 5): device info, then bench/kernels_gpu.py
# (correctness vs the reference backend, layer timings, end-to-end decode). Output goes to
# $OUT/kernels_gpu_run.txt (copied to docs/kernels_gpu_run.txt). Run from the repo root:
#   OUT=/tmp/out bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/bitserve-gpu}
mkdir -p "$OUT"
LOG="$OUT/kernels_gpu_run.txt"
export PYTHONUNBUFFERED=1
# Make the repo importable as bitserve.* without installing (kernels/ is bitserve.kernels).
PKG=$(mktemp -d)
cp -r bitserve "$PKG/"
for sub in kernels quantization server; do ln -s "$PWD/$sub" "$PKG/bitserve/$sub"; done
export PYTHONPATH="$PKG"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "$ python3 bench/kernels_gpu.py $*"
} 2>&1 | tee "$LOG"
timeout "${KERNELS_TIMEOUT:-330}" python3 bench/kernels_gpu.py "$@" 2>&1 | tee -a "$LOG"
# The BCQ LUT-GEMM benchmark (another helper's), when present: same card, same run.
if [ -f bench/lutgemm_gpu.py ] && [ "${LUTGEMM:-1}" = 1 ]; then
    timeout 120 python3 bench/lutgemm_gpu.py --json "$OUT/lutgemm_gpu.json" 2>&1 | tee "$OUT/lutgemm_gpu_run.txt"
fi
