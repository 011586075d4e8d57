#!/usr/bin/env bash
# Create (or refresh) the virtual environment and install custom-llm with its test extras.
#
# PyTorch is chosen for the machine; an existing torch >= 2.6 in the venv is always kept.
# - No NVIDIA GPU (no working nvidia-smi): the pinned CPU-friendly release, torch==2.13.0.
# - An NVIDIA GPU: a CUDA build the installed driver can run, from PyTorch's wheel index for that CUDA
#   (scripts/torch_index.py holds the driver -> CUDA table: R580+ cu130, R570 cu128, R560 cu126,
#   R550 cu124, R520-R545 incl. R535 cu118), then a check that torch.cuda.is_available() is True,
#   with what to do when it is not.
# Overrides (they win over the table): TORCH_SPEC replaces the torch requirement, e.g.
# TORCH_SPEC="torch==2.8.0" scripts/setup.sh; TORCH_INDEX_URL replaces the wheel index; with
# PIP_INDEX_URL set (a mirror) no index is passed and pip uses yours. SETUP_DRY_RUN=1 prints the pip
# commands instead of running them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-${VENV:-.venv}}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"
DRY="${SETUP_DRY_RUN:-0}"

run() {  # run a command, or only show it in a dry run
    if [ "$DRY" = 1 ]; then echo "setup: would run: $*"; else "$@"; fi
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
    run "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
HELPER_PY="$PY"
if [ ! -x "$PY" ]; then HELPER_PY="$PYTHON"; fi  # a dry run does not create the venv

gpu=0
if has_gpu; then gpu=1; fi
if ! "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)' 2>/dev/null; then
    index=()
    if [ "$gpu" = 1 ]; then
        if choice="$("$HELPER_PY" "$HERE/torch_index.py")"; then
            read -r tag requirement url driver <<<"$choice"
            echo "setup: NVIDIA driver $driver runs PyTorch's $tag builds ($requirement from $url)"
        elif [ -z "${TORCH_SPEC:-}" ]; then
            echo "setup: no PyTorch CUDA build fits this driver; upgrade it, or set TORCH_SPEC (and TORCH_INDEX_URL)" >&2
            exit 1
        else
            requirement="" url=""
        fi
        spec="${TORCH_SPEC:-$requirement}"
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            index=(--index-url "$TORCH_INDEX_URL")
        elif [ -z "${PIP_INDEX_URL:-}" ] && [ -n "$url" ]; then
            index=(--index-url "$url")
        fi
    else
        spec="${TORCH_SPEC:-torch==2.13.0}"
        if [ -n "${TORCH_INDEX_URL:-}" ]; then index=(--index-url "$TORCH_INDEX_URL"); fi
    fi
    echo "setup: installing $spec${index[*]:+ (${index[*]})}"
    run "$PY" -m pip install -q "$spec" ${index[@]+"${index[@]}"}
fi
run "$PY" -m pip install -q -e ".[${EXTRAS}]"

if [ "$gpu" = 1 ] && [ "$DRY" != 1 ]; then
    # Can this torch use the GPU? If not, say why (torch's own first line) and how to fix it.
    if report="$("$PY" -c 'import torch; torch.zeros(1, device="cuda"); print(torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))' 2>&1)"; then
        echo "setup: GPU ready: torch $report"
    else
        reason="$(printf '%s\n' "$report" | grep -v '^\s' | tail -n 1)"
        fix="$("$PY" "$HERE/torch_index.py" 2>/dev/null || true)"
        echo "setup: WARNING: this machine has an NVIDIA GPU but torch.cuda.is_available() is False:" >&2
        echo "    $reason" >&2
        echo "    installed: torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)" >&2
        if [ -n "$fix" ]; then
            read -r tag requirement url driver <<<"$fix"
            echo "    fix: install the build for driver $driver:" >&2
            echo "         $PY -m pip install --force-reinstall '$requirement' --index-url $url" >&2
        fi
        echo "    or upgrade the NVIDIA driver (nvidia-smi shows its version); CPU training still works meanwhile." >&2
    fi
fi
if [ "$DRY" != 1 ]; then touch "$VENV/.installed"; fi
