# bitserve: the two commands are `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEFAULT_MODEL := models/SmolLM2-135M-Instruct/config.json

.PHONY: setup serve test test-fast check lint format bench-serve bench-kernels quality clean

setup: $(BIN)/bitserve $(DEFAULT_MODEL)

# torch first (the CPU build on local disk), then the package and its dev extras.
$(BIN)/bitserve: pyproject.toml deploy/install.sh
	VENV=$(VENV) PY=$(PY) deploy/install.sh
	touch $@

$(DEFAULT_MODEL): | $(BIN)/bitserve
	$(BIN)/bitserve fetch-default

serve: setup
	$(BIN)/bitserve serve default --host 127.0.0.1 --port 8000

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m 'not slow'

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) models checkpoints build *.egg-info
