# bitserve image. CPU by default; for one NVIDIA GPU build with a CUDA torch wheel:
#   docker build -t bitserve .                                   # CPU (set TORCH_INDEX_URL to a CPU wheel index)
#   docker build -t bitserve:gpu --build-arg TORCH_SPEC=torch==2.13.0 --build-arg EXTRAS=gpu .
#   docker run --rm -p 8000:8000 [--gpus 1] -v bitserve-models:/app/models bitserve
# The install steps live in deploy/install.sh, which `make setup` and CI run too.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG EXTRAS=
ENV VENV=/opt/bitserve PATH=/opt/bitserve/bin:$PATH PYTHONUNBUFFERED=1 \
    BITSERVE_MODELS=/app/models BITSERVE_HOST=0.0.0.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bitserve bitserve
COPY kernels kernels
COPY quantization quantization
COPY server server
COPY deploy deploy
RUN TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRAS="$EXTRAS" deploy/install.sh \
    && bitserve fetch-default

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
# First start quantizes the default model (W4 g128) into /app/models; later starts reuse it.
# `docker stop` waits 10 s after SIGTERM: requests still running at 8 s end with "abort".
CMD ["bitserve", "serve", "default", "--served-model-name", "default", "--host", "0.0.0.0", \
     "--port", "8000", "--shutdown-timeout", "8"]
