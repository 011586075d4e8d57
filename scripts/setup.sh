#!/usr/bin/env bash
# Create (or refresh) the virtual environment and install custom-llm with its test extras.
#
# PyTorch is chosen for the machine: an existing torch >= 2.6 in the venv is kept; on a machine with an
# NVIDIA driver, pip's default build (CUDA) is installed; elsewhere the pinned CPU-friendly release.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.11.0" scripts/setup.sh, or point pip at another
# index with the usual PIP_INDEX_URL / PIP_EXTRA_INDEX_URL variables.
set -euo pipefail
VENV="${1:-${VENV:-.venv}}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)' 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        spec="$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.6"
    else
        spec="torch==2.13.0"
    fi
    echo "setup: installing $spec"
    "$PY" -m pip install -q "$spec"
fi
"$PY" -m pip install -q -e ".[${EXTRAS}]"
touch "$VENV/.installed"
