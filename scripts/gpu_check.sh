#!/usr/bin/env bash
# GPU check: ten minutes on one NVIDIA GPU (H100/H200 class) that say whether every CUDA path works and
# how fast it is, ending in a summary of a few lines. Nothing is fetched from the network: run
# `make setup` (scripts/setup.sh picks the torch build for the driver) first.
#
#   scripts/gpu_check.sh                   # logs and the summary in runs/gpu_check/<UTC time>/
#   OUT=/some/dir scripts/gpu_check.sh     # ... in /some/dir
#   GPU_CHECK_CPU=1 scripts/gpu_check.sh   # CPU mode: the same steps, CUDA-only parts skipped, tiny sizes
#   STEPS=toolchain,train scripts/gpu_check.sh   # a subset of the steps, in their usual order
#   QUALITY=1 scripts/gpu_check.sh         # also nanoGPT's Shakespeare recipe (bench shakespeare_char, 5 min)
#
# Steps, each with its own time limit (seconds on CUDA; CPU mode allows more, for a small shared CPU;
# overridable: LIMIT_TOOLCHAIN=120 ...), so a stuck one cannot eat the others' time; a limit sends
# SIGINT first, so pytest still prints its report:
#   toolchain  60  inductor compiles and runs a small function; a hand-written Triton kernel is
#                  compiled and launched (Triton needs a C compiler and Python headers at first launch)
#   tests     150  pytest -m cuda -rA --durations=15, each test limited to TEST_TIMEOUT=90 s
#                  (pytest-timeout, from the test extra)
#   train     240  bench train_dense + train_moe, ours compiled: tokens/s vs HF, MFU against the
#                  card's own peak, graphs and graph breaks (on failure: once more eagerly, 90 s)
#   moe        90  compiled MoE training (grouped GEMM under inductor) vs eager: graphs, graph
#                  breaks, recompiles after the first step, loss difference
#   decode    150  bench decode (compiled, CUDA graphs), then batch sizes 1,2,1,2: recompiles and
#                  CUDA-graph skips counted
# At most 11.5 minutes; typically less (compiled kernels are cached on disk between steps).
# Without a GPU visible to torch it runs in CPU mode when asked (GPU_CHECK_CPU=1) or when there is no
# NVIDIA driver at all; a machine whose driver works but whose torch cannot see the GPU fails at once
# with the fix. Exit code: 0 when every step passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"

# $PYTHON when set (an explicit choice), else the project's venv (a system python3 may have another torch), else python3.
if [ -n "${PYTHON:-}" ]; then :; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: $PYTHON cannot import torch; run 'make setup' (or set PYTHON)" >&2
  exit 1
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, even without an install
export TOKENIZERS_PARALLELISM=true
OUT="${OUT:-runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

has_cuda() { "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  MODE=cpu
elif has_cuda; then
  MODE=cuda
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi sees a GPU but torch $("$PYTHON" -c 'import torch; print(torch.__version__)') does not." >&2
  echo "  Reinstall torch for this driver: rm -f .venv/.installed && make setup (see scripts/torch_index.py)," >&2
  echo "  or run GPU_CHECK_CPU=1 $0 for the CPU mode." >&2
  exit 1
else
  MODE=cpu
  echo "gpu_check: no NVIDIA GPU here; CPU mode (CUDA-only parts skipped, tiny sizes)"
fi

# --- the environment, recorded with every number ------------------------------------------------
{
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) | mode $MODE | python $PYTHON"
  if [ "$MODE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | sed 's/^/gpu /'
  fi
  "$PYTHON" - <<'EOF'
import platform, shutil, sysconfig, os, torch
mods = []
for mod in ("triton", "transformers", "pytest_timeout"):
    try:
        mods.append(f"{mod} {getattr(__import__(mod), '__version__', 'yes')}")
    except ImportError:
        mods.append(f"{mod} -")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | python {platform.python_version()} | " + " | ".join(mods))
cc = shutil.which("cc") or shutil.which("gcc")
print(f"C compiler {cc or 'MISSING'} | Python.h {'ok' if os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 'MISSING'}")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", ".".join(map(str, torch.cuda.get_device_capability(0))))
EOF
} 2>&1 | tee "$OUT/env.txt"

# --- steps ------------------------------------------------------------------------------------------
overall=0
passed=0
ran=0
wanted() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }
limit() {  # limit NAME CUDA_S CPU_S: $LIMIT_<NAME> if set, else the mode's default (a shared CPU is slow)
  local var="LIMIT_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"; elif [ "$MODE" = cuda ]; then echo "$2"; else echo "$3"; fi
}

# run_step NAME LIMIT_S COMMAND...: log in $OUT/NAME.log; one summary line (status, seconds, details:
# the command's last "SUMMARY PASS|FAIL ..." line, or pytest's final tally).
run_step() {
  local name=$1 limit=$2; shift 2
  echo
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/$name.log"
  local start=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]} secs=$((SECONDS - start)) status detail
  detail=$(grep -a '^SUMMARY ' "$OUT/$name.log" | tail -n 1 | cut -d' ' -f3-)
  if [ -z "$detail" ]; then
    detail=$(grep -aE '^=+ .* in [0-9.]+s' "$OUT/$name.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  fi
  case $rc in
    0) status=PASS ;;
    5) status=PASS; detail="no tests collected" ;;  # pytest: nothing matched
    124|137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  printf '%-9s %-7s %4ss  %s\n' "$name" "$status" "$secs" "$detail" >> "$SUMMARY"
  ran=$((ran + 1))
  if [ "$status" = PASS ]; then passed=$((passed + 1)); else overall=1; fi
  return $([ "$status" = PASS ] && echo 0 || echo 1)
}
steps=("$PYTHON" scripts/gpu_check_steps.py)

if wanted toolchain; then
  run_step toolchain "$(limit TOOLCHAIN 60 240)" "${steps[@]}" toolchain --device "$MODE"
fi
if wanted tests; then
  pytest_args=(-m cuda -rA --durations=15 -p no:cacheprovider)
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    pytest_args+=(--timeout="${TEST_TIMEOUT:-90}")
  else
    echo "gpu_check: pytest-timeout missing (make setup installs it): one limit for the whole test run" | tee -a "$OUT/tests.log"
  fi
  run_step tests "$(limit TESTS 150 300)" "$PYTHON" -m pytest "${pytest_args[@]}" tests
fi
if wanted train; then
  run_step train "$(limit TRAIN 240 480)" "${steps[@]}" train --device "$MODE" --out "$OUT" \
    || { [ "$(tail -n 1 "$SUMMARY" | awk '{print $2}')" = FAIL ] \
         && run_step train_eager "$(limit TRAIN_EAGER 90 300)" "${steps[@]}" train --device "$MODE" --no-compile --out "$OUT"; }
fi
if wanted moe; then
  run_step moe "$(limit MOE 90 360)" "${steps[@]}" moe --device "$MODE"
fi
if wanted decode; then
  run_step decode "$(limit DECODE 150 600)" "${steps[@]}" decode --device "$MODE" --out "$OUT"
fi
if [ "${QUALITY:-0}" = 1 ]; then
  run_step quality 330 "$PYTHON" -c "import sys; from custom_llm.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --device "$MODE" --json --cases shakespeare_char
fi

# --- summary ------------------------------------------------------------------------------------------
echo
echo "== gpu_check summary ($OUT)"
cat "$OUT/env.txt"
cat "$SUMMARY"
if [ "$MODE" = cpu ]; then echo "(CPU mode: tiny sizes on a CPU; the paths ran, the speeds are no measurement)"; fi
echo "overall: $([ $overall = 0 ] && echo PASS || echo FAIL) ($passed of $ran steps passed)"
exit $overall
