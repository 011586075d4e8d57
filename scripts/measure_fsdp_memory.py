"""Per-rank memory of DDP vs FSDP, measured on the tensors each rank holds, next to the planner's numbers.

    torchrun --standalone --nproc_per_node 2 scripts/measure_fsdp_memory.py --parallel fsdp --preset small
    torchrun --standalone --nproc_per_node 2 scripts/measure_fsdp_memory.py --parallel ddp --preset small

One optimizer step of the run's own parts (training/parts.py) on random tokens; then each rank
reports the bytes of its local parameter shards, its gradients (after the backward, before the
step) and its optimizer state (after the step), the process's peak RSS, and the planner's
prediction (training/memory.py) for the same strategy and world size. One JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

import numpy as np
import torch

from custom_llm.config import MODEL_PRESETS, ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.fsdp import local_numel
from custom_llm.training.memory import model_sizes, plan_memory
from custom_llm.training.parts import build_parts


def local_bytes(tensors) -> int:
    return sum(local_numel(t) * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    mc = ModelConfig(**MODEL_PRESETS[args.preset])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tc = TrainConfig(batch_size=args.batch * world, seq_len=args.seq_len, device="cpu", precision="fp32",
                     parallel=args.parallel, compile=False)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, size=100_000).astype(np.uint16)
    parts = build_parts(mc, tc, tokens)
    x, y = (torch.from_numpy(a) for a in parts.loader.next_batch())
    loss = parts.net(x, y)[0]
    loss.backward()
    grads = local_bytes(p.grad for p in parts.model.parameters() if p.grad is not None)
    parts.optimizer.step()
    state = [t for s in parts.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    strategy = "zero3" if args.parallel == "fsdp" else "ddp"
    plan = plan_memory(mc, model_sizes(mc, args.seq_len), strategy, world, args.batch, args.seq_len, "fp32",
                       "adamw", False, 1e15)
    print(json.dumps({"rank": parts.rt.rank, "parallel": args.parallel, "preset": args.preset,
                      "params_mib": local_bytes(parts.model.parameters()) / 2**20, "grads_mib": grads / 2**20,
                      "optimizer_mib": local_bytes(state) / 2**20,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "planned_params_mib": plan.params / 2**20, "planned_grads_mib": plan.grads / 2**20,
                      "planned_optimizer_mib": plan.optimizer / 2**20}), flush=True)
    if parts.rt.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
