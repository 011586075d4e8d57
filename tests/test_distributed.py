"""DDP on CPU: two gloo processes under torchrun train like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from custom_llm.training.metrics import read_metrics

JOB = '''
import json, sys, types
import numpy as np
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from custom_llm.config import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.loop import train_loop
from custom_llm.training.parts import build_parts

rng = np.random.default_rng(0)
base = rng.integers(0, 64, size=31)
tokens = np.concatenate([np.roll(base, i) for i in range(120)]).astype(np.uint16)
data = types.SimpleNamespace(train=tokens[:3400], val=tokens[3400:])
model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
cfg = TrainConfig(max_steps=5, batch_size=8, grad_accum_steps=2, lr=3e-3, warmup_steps=1, eval_every=5,
                  eval_batches=2, eval_batch_size=4, log_every=1, device="cpu", precision="fp32", sample_tokens=0)
parts = build_parts(model, cfg, data.train)
reductions = []  # (DDP forwards so far, bucket index) for each gradient all-reduce
if parts.rt.distributed:  # parts.net is the DistributedDataParallel module
    forwards = [0]
    parts.net.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))

    def counting_allreduce(state, bucket):  # DDP's default averaging all-reduce, counted
        reductions.append((forwards[0], bucket.index()))
        return allreduce_hook(state, bucket)

    parts.net.register_comm_hook(None, counting_allreduce)
train_loop(parts, sys.argv[1], data, progress=False)
if parts.rt.distributed:
    with open(f"{sys.argv[1]}-reductions-rank{parts.rt.rank}.json", "w") as f:
        json.dump(reductions, f)
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
    # Gradient accumulation under DDP: gradients are all-reduced only on the last of the 2 micro-steps
    # (no_sync on the first), i.e. after forwards 2, 4, ..., 10, once per bucket; never after forward 1, 3, ...
    for rank in (0, 1):
        reductions = json.loads((tmp_path / f"ddp-reductions-rank{rank}.json").read_text())
        per_forward = {}
        for forward, bucket in reductions:
            per_forward.setdefault(forward, []).append(bucket)
        assert sorted(per_forward) == [2, 4, 6, 8, 10], (rank, reductions)
        for forward, buckets in per_forward.items():
            assert len(buckets) == len(set(buckets)), (rank, forward, buckets)  # one all-reduce per bucket
