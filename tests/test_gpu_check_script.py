"""scripts/gpu_check.sh's own logic, in seconds: step limits, status and summary lines, the eager retry.

The real steps take minutes (the whole CPU mode is run by hand and recorded in BENCHMARKS.md); here
``PYTHON`` is a stand-in whose steps pass, fail or hang on request, so what is checked is the shell
script: a hanging step is stopped at its limit and reported TIMEOUT, a failed compiled training bench
is retried eagerly, details come from each step's ``SUMMARY`` line or pytest's tally, and the exit code
is 1 unless every step passed.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

FAKE_PYTHON = r"""#!/bin/sh
# A stand-in interpreter: gpu_check_steps.py steps behave as FAKE_<step> says; pytest prints a tally.
case "$1" in
  scripts/gpu_check_steps.py)
    step=$2
    case " $* " in *" --no-compile "*) step=${step}_eager ;; esac
    eval "what=\${FAKE_$step:-pass}"
    echo "$*" >> "$CALLS"
    case $what in
      pass) echo "SUMMARY PASS step=$step"; exit 0 ;;
      fail) echo "SUMMARY FAIL step=$step"; exit 1 ;;
      hang) exec sleep 30 ;;
    esac ;;
  -m) echo "$*" >> "$CALLS"; echo "================ 3 passed, 2 skipped in 1.50s ================"; exit 0 ;;
  -) cat > /dev/null; echo "torch (stand-in)"; exit 0 ;;
  -c) exit 0 ;;
esac
exit 3
"""


def _run(tmp_path: Path, **env_extra) -> tuple[subprocess.CompletedProcess, str, str]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIMIT_", "STEPS", "FAKE_", "QUALITY"))}
    env.update(PYTHON=str(python), OUT=str(out), CALLS=str(calls), GPU_CHECK_CPU="1", **env_extra)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    return proc, summary, calls.read_text() if calls.exists() else ""


def test_every_step_passing_gives_a_pass_summary(tmp_path):
    proc, summary, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split()[0] for line in summary.splitlines()]
    assert names == ["toolchain", "tests", "train", "moe", "decode"]
    assert all(line.split()[1] == "PASS" for line in summary.splitlines())
    assert "3 passed, 2 skipped in 1.50s" in summary and "step=decode" in summary
    assert "-m pytest -m cuda -rA --durations=15" in calls
    assert "overall: PASS (5 of 5 steps passed)" in proc.stdout


def test_a_hanging_step_times_out_and_the_rest_still_run(tmp_path):
    proc, summary, _ = _run(tmp_path, FAKE_moe="hang", LIMIT_MOE="1")
    assert proc.returncode == 1
    lines = {line.split()[0]: line.split()[1] for line in summary.splitlines()}
    assert lines == {"toolchain": "PASS", "tests": "PASS", "train": "PASS", "moe": "TIMEOUT", "decode": "PASS"}
    assert "overall: FAIL (4 of 5 steps passed)" in proc.stdout


def test_failed_compiled_training_is_retried_eagerly(tmp_path):
    proc, summary, calls = _run(tmp_path, FAKE_train="fail", STEPS="train")
    assert proc.returncode == 1
    assert [line.split()[:2] for line in summary.splitlines()] == [["train", "FAIL"], ["train_eager", "PASS"]]
    assert "train --device cpu --no-compile" in calls
