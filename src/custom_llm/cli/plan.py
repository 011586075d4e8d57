"""``custom-llm plan``: per-GPU memory under DDP and FSDP (ZeRO-2 / ZeRO-3), the largest micro-batch that
fits, and the step time at a stated MFU, for a run config (see training/memory.py for the counts)."""

from __future__ import annotations

import argparse
import json

from ..training.config import RUN_PRESETS
from .train import add_config_flags

H100_BF16_TFLOPS = 989.0


def register(sub) -> None:
    """Add the ``plan`` sub-command."""
    parser = sub.add_parser("plan", help="plan memory and step time on N GPUs (DDP vs FSDP)",
                            description="Estimate, per GPU, parameters, gradients, optimizer state, communication "
                                        "buffers and activations (with and without gradient checkpointing) for DDP, "
                                        "FSDP ZeRO-2 (reshard_after_forward false) and ZeRO-3; the largest "
                                        "micro-batch that fits in 90%% of --gpu-memory; FLOPs per step and the step "
                                        "time at --mfu of --peak-tflops. Counts follow this trainer: fp32 master "
                                        "weights, gradients and optimizer state, bf16 autocast.")
    parser.add_argument("--config", metavar="FILE", help="run config (YAML or JSON) with 'model' and 'train' sections")
    parser.add_argument("--preset", choices=RUN_PRESETS, help="model preset plus matching train defaults")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default: 8)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default: 80GB)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: train.seq_len or model.max_seq_len)")
    parser.add_argument("--micro-batch", type=int, default=1, help="micro-batch of the memory breakdown (default: 1)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default: 0.4)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                        help="dense bf16 peak of one GPU in TFLOP/s (default: 989, H100 SXM)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="training precision (default: bf16)")
    parser.add_argument("--json", action="store_true", help="one JSON object per strategy")
    add_config_flags(parser)
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ..config import load_config_file
    from ..errors import ConfigError, UserError
    from ..training.config import resolve_run_config
    from ..training.memory import (STRATEGIES, activation_bytes, describe, largest_micro_batch, model_sizes,
                                   parse_bytes, plan_memory, step_time)
    from .train import collect_overrides

    if args.gpus < 1 or args.micro_batch < 1 or not 0 < args.mfu <= 1 or args.peak_tflops <= 0:
        raise UserError("--gpus and --micro-batch must be >= 1, --mfu in (0, 1], --peak-tflops > 0")
    try:
        memory = parse_bytes(args.gpu_memory)
    except ValueError as exc:
        raise UserError(f"--gpu-memory: {exc}") from None
    overrides, problems = collect_overrides(args)
    if problems:
        raise ConfigError("; ".join(problems))
    mc, tc = resolve_run_config(args.preset, load_config_file(args.config) if args.config else None, overrides)
    seq_len = args.seq_len or tc.seq_len or mc.max_seq_len
    sizes = model_sizes(mc, seq_len)
    optimizer = tc.optimizer
    flops, seconds, tokens_per_s = step_time(sizes, tc.batch_size, seq_len, args.gpus, args.peak_tflops * 1e12, args.mfu)
    common = dict(seq_len=seq_len, precision=args.precision, optimizer=optimizer, gpu_memory=memory)
    if not args.json:
        print(f"model: {sizes.params / 1e9:.3f}B parameters, {args.gpus} GPUs x {memory / 2**30:.0f} GiB, seq_len "
              f"{seq_len}, {optimizer}, {args.precision}; breakdown per GPU at micro-batch {args.micro_batch}"
              f"{' with' if mc.grad_checkpointing else ' without'} gradient checkpointing (GiB):")
    for strategy in STRATEGIES:
        plan = plan_memory(mc, sizes, strategy, args.gpus, args.micro_batch, checkpointing=mc.grad_checkpointing,
                           **common)
        with_ckpt = largest_micro_batch(mc, sizes, strategy, args.gpus, checkpointing=True, **common)
        without = largest_micro_batch(mc, sizes, strategy, args.gpus, checkpointing=False, **common)
        if args.json:
            print(json.dumps({**plan.to_dict(), "gpus": args.gpus, "seq_len": seq_len, "parameters": sizes.params,
                              "activations_checkpointing": activation_bytes(mc, args.micro_batch, seq_len,
                                                                            args.precision, True),
                              "activations_no_checkpointing": activation_bytes(mc, args.micro_batch, seq_len,
                                                                               args.precision, False),
                              "largest_micro_batch_checkpointing": with_ckpt,
                              "largest_micro_batch_no_checkpointing": without, "global_batch": tc.batch_size,
                              "flops_per_step": flops, "step_seconds": seconds, "tokens_per_s": tokens_per_s,
                              "mfu": args.mfu, "peak_tflops": args.peak_tflops}))
        else:
            print(f"  {describe(plan)}; largest micro-batch {with_ckpt} with checkpointing, {without} without")
    if not args.json:
        print(f"global batch {tc.batch_size} x {seq_len} tokens: {flops:.3g} FLOPs per step, {seconds:.3g} s per step, "
              f"{tokens_per_s:,.0f} tokens/s at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s per GPU")
    return 0
