"""DDP on CPU: two gloo processes under torchrun train like one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from custom_llm.training.metrics import read_metrics

JOB = '''
import sys, types
import numpy as np
from custom_llm.config import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.trainer import train

rng = np.random.default_rng(0)
base = rng.integers(0, 64, size=31)
tokens = np.concatenate([np.roll(base, i) for i in range(120)]).astype(np.uint16)
data = types.SimpleNamespace(train=tokens[:3400], val=tokens[3400:])
model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
cfg = TrainConfig(max_steps=5, batch_size=8, grad_accum_steps=2, lr=3e-3, warmup_steps=1, eval_every=5,
                  eval_batches=2, eval_batch_size=4, log_every=1, device="cpu", precision="fp32", sample_tokens=0)
train(model, cfg, sys.argv[1], data, progress=False)
'''


def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, str(script), str(tmp_path / "single")], check=True, timeout=300, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "ddp")], check=True, timeout=300, env=env)
    single, ddp = read_metrics(tmp_path / "single" / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] and len(single) >= 5
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single]
    for a, b in zip(single, ddp):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    w1, w2 = (load_file(str(tmp_path / d / "ckpt-5" / "model.safetensors")) for d in ("single", "ddp"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "ddp" / "ckpt-5" / "tokenizer.json").exists()
