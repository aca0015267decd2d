# bitserve image. CPU by default (torch's CPU wheel); for one NVIDIA GPU, torch's CUDA wheel from
# PyPI (empty TORCH_INDEX_URL) and Triton:
#   docker build -t bitserve .                                                      # CPU
#   docker build -t bitserve:gpu --build-arg TORCH_INDEX_URL= --build-arg EXTRAS=gpu .   # GPU
#   docker run --rm -p 8000:8000 [--gpus 1] -v bitserve-models:/app/models bitserve
# Settings are BITSERVE_* variables (docker run -e BITSERVE_MAX_NUM_SEQS=32 -e BITSERVE_PORT=...);
# another model: docker run -e BITSERVE_MODEL=/app/models/CKPT -e BITSERVE_SERVED_MODEL_NAME=ID ...
# The install steps live in deploy/install.sh, which `make setup` and CI run too.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=
# BITSERVE_CACHE_DIR: Triton configs tuned at warm-up are kept in the models volume, so that a new
# container on the same GPU does not tune them again.
ENV VENV=/opt/bitserve PATH=/opt/bitserve/bin:$PATH PYTHONUNBUFFERED=1 \
    BITSERVE_MODELS=/app/models BITSERVE_CACHE_DIR=/app/models/.cache/bitserve \
    BITSERVE_HOST=0.0.0.0 BITSERVE_PORT=8000 BITSERVE_SHUTDOWN_TIMEOUT=5 \
    BITSERVE_MODEL=default BITSERVE_SERVED_MODEL_NAME=default

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bitserve bitserve
COPY kernels kernels
COPY quantization quantization
COPY server server
COPY deploy deploy
# A C compiler, which python:*-slim lacks: the CPU backend compiles its own matmul kernel
# (kernels/cpu_gemv.c) for the machine it runs on at first use, and Triton (GPU image) builds
# its launchers with one at run time.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRAS="$EXTRAS" deploy/install.sh \
    && bitserve fetch-default

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python", "-c", \
    "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('BITSERVE_PORT', '8000'), timeout=2)"]
# bitserve is PID 1: the kernel drops a signal it has no handler for, and until uvicorn runs
# (loading, first-start quantization) only SIGINT has one, so `docker stop` would wait its 10 s
# and kill. uvicorn treats SIGINT like SIGTERM; the exit status is then 130.
STOPSIGNAL SIGINT
# First start quantizes the default model (W4 g128) into /app/models; later starts reuse it.
# `docker stop` waits 10 s: requests still running after BITSERVE_SHUTDOWN_TIMEOUT (5 s) end
# with "abort", and the process must then exit before the kill
# (tests/test_deploy.py::test_docker_stop_fits_the_grace_period). Raise both together
# (docker stop -t, compose stop_grace_period).
CMD ["bitserve", "serve"]
