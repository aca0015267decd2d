# bitserve: the two commands are `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEFAULT_MODEL := models/SmolLM2-135M-Instruct/config.json

.PHONY: setup serve test test-fast check bench-serve bench-kernels bench-kernels-gpu bench-load-memory bench-rtn-quality clean

setup: $(BIN)/bitserve $(DEFAULT_MODEL)

# torch first (the CPU build on local disk), then the package and its dev extras.
$(BIN)/bitserve: pyproject.toml deploy/install.sh
	VENV=$(VENV) PY=$(PY) deploy/install.sh
	touch $@

$(DEFAULT_MODEL): | $(BIN)/bitserve
	$(BIN)/bitserve fetch-default

serve: setup
	$(BIN)/bitserve serve default --host 127.0.0.1 --port 8000 --served-model-name default

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m 'not slow'

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Benchmarks (not tests): each reports ratios against a baseline measured in the same run.
bench-serve: setup
	$(BIN)/python bench/serve.py --requests 4

bench-kernels: setup
	$(BIN)/python bench/kernels_cpu.py

bench-kernels-gpu: setup   # on a machine with an NVIDIA GPU
	bash bench/gpu_check.sh

bench-load-memory: setup
	$(BIN)/bitserve quantize default --out checkpoints/rtn-w4g128 --force
	$(BIN)/python bench/load_memory.py checkpoints/rtn-w4g128 models/SmolLM2-135M-Instruct

bench-rtn-quality: setup
	$(BIN)/python bench/rtn_quality.py --text ../shared/data/wikitext-2/test.txt

clean:
	rm -rf $(VENV) models checkpoints build *.egg-info
