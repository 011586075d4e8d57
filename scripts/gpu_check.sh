#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and torch / transformers / triton already installed
# (nothing is fetched from the network), run the CUDA-marked tests and the CUDA benchmarks.
#
#   scripts/gpu_check.sh            # from anywhere; 7.5 minutes at most (120 + 150 [+ 60] + 120 s)
#   OUT=/some/dir scripts/gpu_check.sh   # also keep the logs and bench JSON lines in $OUT
#   QUALITY=1 scripts/gpu_check.sh       # then also nanoGPT's Shakespeare recipe (bench shakespeare_char,
#                                        # 5000 steps; up to 5 more minutes; needs ../shared/data)
#
# Each part has its own time limit (`timeout`), so one stuck part cannot eat the others' time.
# Exit code: 0 when every part passed, 1 otherwise; without a GPU it says so and exits 1 at once.
set -u
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-}"
if [ -n "$OUT_DIR" ]; then mkdir -p "$OUT_DIR"; fi
log() { if [ -n "$OUT_DIR" ]; then tee -a "$OUT_DIR/$1"; else cat; fi; }

# The first interpreter that has torch: $PYTHON if set, else python3, python, then .venv/bin/python.
for candidate in ${PYTHON:-} python3 python .venv/bin/python; do
  if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
done
if [ -z "${PYTHON:-}" ]; then echo "gpu_check: no Python with torch found" >&2; exit 1; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, no install needed
export TOKENIZERS_PARALLELISM=true

status=0
{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; else echo "nvidia-smi: not available"; fi
  "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
for mod in ("transformers", "triton", "tokenizers"):
    try:
        print(mod, __import__(mod).__version__)
    except ImportError:
        print(mod, "not installed")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF
} 2>&1 | log env.txt

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch; nothing to check here" | log env.txt
  exit 1
fi

echo "== pytest -m cuda (limit 120 s)" | log tests.txt
timeout 120 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | log tests.txt
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || { echo "gpu_check: CUDA tests exit code $rc" | log tests.txt; status=1; }

# Training cases first (the goals that matter most), then inference; each call has its own limit.
run_bench() {  # run_bench LIMIT_S CASES [extra flags]
  local limit=$1 cases=$2; shift 2
  echo "== custom-llm bench --device cuda --json --cases $cases $* (limit ${limit} s)" | log bench.log
  timeout "$limit" "$PYTHON" -c "import sys; from custom_llm.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --device cuda --json --cases "$cases" "$@" \
    2> >(log bench.log >&2) | log bench.jsonl
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check: bench $cases exit code $rc" | log bench.log
    return 1
  fi
}
run_bench 150 train_dense,train_moe || { run_bench 60 train_dense,train_moe --no-compile || status=1; }
run_bench 120 decode,prefill,grad_ckpt_memory || status=1
if [ "${QUALITY:-0}" = 1 ]; then run_bench 300 shakespeare_char || status=1; fi

echo "== gpu_check done, status $status" | log env.txt
exit $status
