#!/usr/bin/env bash
# The one script run on a lent GPU machine (issue 5): device info, the mma GEMV prototype
# (bench/mma_gemv.py), then bench/kernels_gpu.py
# (correctness vs the reference backend, layer timings, end-to-end decode, the serving runner),
# then bench/gpu_serve_check.py (`bitserve serve --device cuda` over HTTP). Output goes to
# $OUT/kernels_gpu_run.txt (copied to docs/kernels_gpu_run.txt). Run from the repo root:
#   OUT=/tmp/out bash bench/gpu_check.sh [--ms 1,2,4,16,64,256,1024]
# Time: MMA_TIMEOUT (default 200 s, MMA=0 skips it) + KERNELS_TIMEOUT (default 300 s,
# KERNELS=0 skips it) + SERVE_TIMEOUT (default 240 s, SERVE=0 skips it; each server warms up,
# tuning and capturing, before it answers)
# + LUTGEMM_TIMEOUT (default 90 s, LUTGEMM=0 skips it). Wheels in .whl/ (the server's
# dependencies that a bare GPU image may lack) are installed first; to fetch them for Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl fastapi starlette pydantic pydantic-core pydantic-settings uvicorn annotated-types \
#     annotated-doc typing-inspection typing-extensions python-dotenv opentelemetry-api
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_31_x86_64 -d .whl llguidance
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
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$PKG/site" .whl/*.whl && export PYTHONPATH="$PKG:$PKG/site"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG"
# The mma GEMV prototype (bench/mma_gemv.py): its correctness, then its timing against the
# backend's tuned kernels (MMA_TIMEOUT, default 200 s; MMA=0 skips it).
if [ "${MMA:-1}" = 1 ]; then
    MT=${MMA_TIMEOUT:-200}
    echo -e "\n$ python3 bench/mma_gemv.py --budget-s $((MT - 30))" | tee -a "$LOG"
    timeout "$MT" python3 bench/mma_gemv.py --budget-s $((MT - 30)) 2>&1 | tee -a "$LOG"
    echo "(mma_gemv.py exit ${PIPESTATUS[0]}, $SECONDS s since start)" | tee -a "$LOG"
fi
# The benchmark stops its own sections 25 s before the hard timeout, so the output is complete.
if [ "${KERNELS:-1}" = 1 ]; then
    KT=${KERNELS_TIMEOUT:-300}
    echo -e "\n$ python3 bench/kernels_gpu.py $*" | tee -a "$LOG"
    timeout "$KT" python3 bench/kernels_gpu.py --budget-s $((KT - 25)) "$@" 2>&1 | tee -a "$LOG"
    echo "(kernels_gpu.py exit ${PIPESTATUS[0]}, $SECONDS s since start)" | tee -a "$LOG"
fi
if [ "${SERVE:-1}" = 1 ]; then
    echo -e "\n## bitserve serve --device cuda over HTTP (bench/gpu_serve_check.py)" | tee -a "$LOG"
    timeout "${SERVE_TIMEOUT:-240}" python3 bench/gpu_serve_check.py --timeout 150 2>&1 | tee -a "$LOG"
    echo "(gpu_serve_check.py exit ${PIPESTATUS[0]}, $SECONDS s since start)" | tee -a "$LOG"
fi
# The BCQ LUT-GEMM benchmark (another helper's), when present: same card, same run.
if [ -f bench/lutgemm_gpu.py ] && [ "${LUTGEMM:-1}" = 1 ]; then
    timeout "${LUTGEMM_TIMEOUT:-90}" python3 bench/lutgemm_gpu.py --json "$OUT/lutgemm_gpu.json" 2>&1 | tee "$OUT/lutgemm_gpu_run.txt"
fi
