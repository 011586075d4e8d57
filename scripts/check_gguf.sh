#!/usr/bin/env bash
# Check our GGUF export against llama.cpp itself, through llama-cpp-python built from PyPI's source
# distribution (a C++ build: ~10-30 minutes on 2 cores). Usage: scripts/check_gguf.sh [VENV]
# Builds for a generic x86-64 CPU (GGML_NATIVE=OFF) without tests/examples, then runs the slow test
# tests/test_gguf_llamacpp.py (token ids, next-token logits and greedy continuations).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python from source (this takes a while)..."
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python>=0.3"
fi
"$PY" -c "import llama_cpp, torch; print('llama-cpp-python', llama_cpp.__version__, '| torch', torch.__version__)"
"$PY" -m pytest -q -rs tests/test_gguf_llamacpp.py "${@:2}"
