"""CUDA-only checks of the memory planner and FSDP (skipped without an NVIDIA GPU; FSDP needs two).

The planner's bf16 activation sizes (2 B matmul tensors, 4 B norms on the fp32 residual stream) are
reasoning on the CPU; here they meet ``torch.cuda.memory_allocated`` around a real forward under
autocast, within 15% as on the CPU.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.training.memory import activation_bytes, layer_activation_bytes

pytestmark = pytest.mark.cuda

CONFIGS = {
    "dense": dict(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1408),
    "moe": dict(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, n_experts=8, moe_top_k=2,
                moe_ffn_dim=512),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_activation_estimate_matches_cuda_allocations(name, checkpointing):
    B, T = 4, 1024
    cfg = ModelConfig(max_seq_len=T, grad_checkpointing=checkpointing, **CONFIGS[name])
    model = Transformer(cfg).cuda().train()
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.compute_loss(ids, ids)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before  # what the forward leaves for the backward
    predicted = activation_bytes(cfg, B, T, "bf16", checkpointing)
    if checkpointing:  # the forward keeps block inputs; the one-block recompute comes in the backward
        predicted -= max(layer_activation_bytes(cfg, B, T, "bf16"))
    del out
    assert kept == pytest.approx(predicted, rel=0.15), (name, kept, predicted)

JOB = '''
import json, os, sys, types
import numpy as np, torch
from custom_llm.config import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.fsdp import local_numel
from custom_llm.training.loop import train_loop
from custom_llm.training.parts import build_parts
tokens = np.random.default_rng(0).integers(0, 4096, size=400_000).astype(np.uint16)
data = types.SimpleNamespace(train=tokens[:380_000], val=tokens[380_000:])
mc = ModelConfig(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=512, grad_checkpointing=True)
tc = TrainConfig(max_steps=20, batch_size=16, grad_accum_steps=2, lr=1e-3, warmup_steps=2, eval_every=10, eval_batches=2,
                 log_every=1, save_every=10, device="cuda", precision="bf16", parallel=sys.argv[2], compile=True,
                 sample_tokens=0)
parts = build_parts(mc, tc, data.train)
train_loop(parts, sys.argv[1], data, progress=False)
with open(f"{sys.argv[1]}-rank{parts.rt.rank}.json", "w") as f:
    json.dump({"params": sum(local_numel(p) for p in parts.model.parameters()),
               "peak": torch.cuda.max_memory_allocated()}, f)
'''


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs")
def test_fsdp_on_two_gpus_trains_compiled_bf16_and_halves_the_parameters(tmp_path):
    from custom_llm.checkpoint_io import load_checkpoint_model
    from custom_llm.training.metrics import read_metrics

    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for parallel in ("ddp", "fsdp"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / parallel), parallel], check=True, timeout=600, env=env)
    losses = {p: [r["loss"] for r in read_metrics(tmp_path / p / "metrics.jsonl") if "loss" in r] for p in ("ddp", "fsdp")}
    assert losses["fsdp"][-1] < losses["fsdp"][0] - 0.5
    assert losses["fsdp"][-1] == pytest.approx(losses["ddp"][-1], rel=0.02)  # bf16 gathers vs autocast: close
    ddp, fsdp = (json.loads((tmp_path / f"{p}-rank0.json").read_text()) for p in ("ddp", "fsdp"))
    assert fsdp["params"] / ddp["params"] == pytest.approx(0.5, abs=0.02)
    assert fsdp["peak"] < ddp["peak"]
    assert load_checkpoint_model(tmp_path / "fsdp" / "ckpt-20") is not None
