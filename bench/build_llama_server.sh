#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU, this machine's instruction set) from the llama-cpp-python
# sdist on PyPI, which vendors llama.cpp: the baseline of `bench/serve.py --servers llama-server`.
# Not part of `make setup`; about 6 minutes on 2 cores. Prints the binary's path.
#
#   bash bench/build_llama_server.sh [DIR]     # DIR defaults to build/llama.cpp (git-ignored)
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
dir=${1:-build/llama.cpp}
py=${PY:-.venv/bin/python}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$dir" "llama-cpp-python==$version" >&2
  tar -xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
fi
# AMX off: VMs may advertise it without the kernel letting a process use it (invalid opcode).
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" >&2
cmake --build "$src/build" -j "$(nproc)" --target llama-server llama-bench >&2
echo "$src/build/bin/llama-server"
