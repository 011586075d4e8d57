"""Exact resume: a run of N steps equals one interrupted (SIGTERM, or SIGKILL after a save) and resumed.

CPU, fp32, gradient accumulation 2, and a curriculum stage change (seq_len 16 -> 32, batch 4 -> 8)
inside the resumed window: final weights must be bit-identical and the logged losses identical.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from custom_llm.training.metrics import read_metrics

N_STEPS = 14
# One intra-op thread: much faster for tiny models on a shared machine, and the same in every run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

JOB = '''
import sys, types, logging
logging.basicConfig(level=logging.INFO)
import numpy as np
from custom_llm.config import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.loop import train

def dataset():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, size=37)
    tokens = np.concatenate([np.roll(base, i) for i in range(200)]).astype(np.uint16)
    return types.SimpleNamespace(train=tokens[:6000], val=tokens[6000:])

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, dropout=0.1)
TRAIN = TrainConfig(max_steps=%d, batch_size=8, grad_accum_steps=2, lr=3e-3, warmup_steps=3, eval_every=4,
                    eval_batches=2, eval_batch_size=4, log_every=1, save_every=4, device="cpu", precision="fp32",
                    curriculum=[dict(seq_len=16, batch_size=4, max_steps=10), dict(seq_len=32, batch_size=8)])

if __name__ == "__main__":
    train(MODEL, TRAIN, sys.argv[1], dataset(), resume=sys.argv[2] == "1", progress=False)
''' % N_STEPS


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    script = folder / "job.py"
    script.write_text(JOB)
    reference = folder / "reference"
    subprocess.run([sys.executable, str(script), str(reference), "0"], check=True, timeout=300, env=ENV)
    return script, reference


def _start(script: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(run_dir), "0"], stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _assert_same_run(reference: Path, resumed: Path):
    ref = load_file(str(reference / f"ckpt-{N_STEPS}" / "model.safetensors"))
    got = load_file(str(resumed / f"ckpt-{N_STEPS}" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    ref_rows, got_rows = read_metrics(reference / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    losses = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss"), r.get("stage")) for r in rows]
    assert losses(got_rows) == losses(ref_rows)
    changes = [r for r in ref_rows if "stage_change" in r]
    assert [r["step"] for r in changes] == [10]
    state = json.loads((resumed / f"ckpt-{N_STEPS}" / "trainer_state.json").read_text())
    assert state["curriculum"]["transitions"][0]["step"] == 10


def test_sigterm_then_resume_is_bit_identical(job, tmp_path):
    script, reference = job
    run_dir = tmp_path / "run"
    proc = _start(script, run_dir)
    rows = lambda: read_metrics(run_dir / "metrics.jsonl")
    _wait_for(lambda: any(r["step"] >= 5 for r in rows()), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("ckpt-*"))
    stopped_at = saved[-1]
    assert 5 <= stopped_at < 10, saved  # interrupted before the stage change at step 10
    assert "finishing this step" in stderr
    subprocess.run([sys.executable, str(script), str(run_dir), "1"], check=True, timeout=300, env=ENV)
    _assert_same_run(reference, run_dir)


def test_kill_after_save_then_resume_is_bit_identical(job, tmp_path):
    script, reference = job
    run_dir = tmp_path / "run"
    proc = _start(script, run_dir)
    _wait_for(lambda: (run_dir / "ckpt-8").is_dir(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    newest = max(int(p.name.split("-")[1]) for p in run_dir.glob("ckpt-*"))
    assert newest < N_STEPS
    leftover = run_dir / f".ckpt-{newest + 4}.tmp-crash"  # what a save cut short leaves behind
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    subprocess.run([sys.executable, str(script), str(run_dir), "1"], check=True, timeout=300, env=ENV)
    assert not leftover.exists()
    _assert_same_run(reference, run_dir)
