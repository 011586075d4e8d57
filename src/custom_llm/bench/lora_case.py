"""LoRA fine-tuning against full fine-tuning: training-step memory and time on the ``small`` preset.

Memory of a step = what is alive before it (weights, optimizer state) + the peak torch allocates during
it (activations, gradients), measured as in ``grad_ckpt_memory``. LoRA (r=8 on q/v, the default) keeps
the same weights but has gradients and AdamW state only for the adapters. Activations are the same on
both sides, so the headline runs both with gradient checkpointing (as LoRA fine-tuning usually runs,
``ModelConfig.grad_checkpointing``), where weights and optimizer state dominate; the ratio without it
is in the config. Goal: LoRA's step at most 40% of full fine-tuning's memory.
"""

from __future__ import annotations

import torch

from ..config import MODEL_PRESETS
from ..model.lora import LoRAConfig, apply_lora
from .context import Context, build_model, dtype_name, ours_loss, random_batch, train_step
from .core import Result, median, peak_memory_bytes, time_alternating
from .sizes import QUICK_DENSE

LR = 1e-4


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, buffers and optimizer state: what stays allocated between steps."""
    state = [v for s in optimizer.state.values() for v in s.values()]
    return _tensor_bytes([*model.parameters(), *model.buffers(), *state])


def _setup(ctx: Context, fields: dict, lora: bool, batch: int, seq_len: int, checkpointing: bool = True):
    from ..training.optim import make_adamw

    model = build_model(fields, ctx.device, ctx.seed, grad_checkpointing=checkpointing)
    if lora:
        apply_lora(model, LoRAConfig())
    if ctx.compile:
        model.compile_blocks()
    x, y = random_batch(model.config.vocab_size, batch, seq_len, ctx.device, ctx.seed)
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], ctx.device, lr=LR)
    return model, optimizer, train_step(lambda: ours_loss(model, x, y), optimizer, ctx.device, ctx.sizes.autocast)


def lora_memory(ctx: Context) -> Result:
    """Peak training-step memory of LoRA fine-tuning (ours) over full fine-tuning (ref); step times in config."""
    s, device = ctx.sizes, ctx.device
    fields = dict(QUICK_DENSE) if ctx.quick else dict(MODEL_PRESETS["small"])
    batch, seq_len = (s.batch, s.seq_len) if ctx.quick else ((16, 512) if device.type == "cuda" else (4, 256))
    runs = {name: _setup(ctx, fields, lora, batch, seq_len) for name, lora in (("lora", True), ("full", False))}
    # Alternating rounds (the warm-up creates the AdamW state), so a change of machine load hits both.
    rounds = time_alternating({name: run[2] for name, run in runs.items()}, device, s.repeats, max(1, s.warmup))
    times = {name: median(t) for name, t in rounds.items()}
    peaks = {name: (_resident_bytes(model, optimizer) + peak_memory_bytes(step, device)) / 2**20
             for name, (model, optimizer, step) in runs.items()}
    params = {name: sum(p.numel() for p in run[0].parameters() if p.requires_grad) for name, run in runs.items()}
    del runs
    plain = {}  # the same without gradient checkpointing: memory only (one warm-up step creates AdamW's state)
    for name, lora in (("lora", True), ("full", False)):
        model, optimizer, step = _setup(ctx, fields, lora, batch, seq_len, checkpointing=False)
        step()
        plain[name] = (_resident_bytes(model, optimizer) + peak_memory_bytes(step, device)) / 2**20
        del model, optimizer, step
    config = {"model": "small preset" if not ctx.quick else dict(fields), "batch": batch, "seq_len": seq_len,
              "dtype": dtype_name(s.autocast), "lora": "r=8 alpha=16 on q_proj,v_proj (the defaults)",
              "ours": "LoRA step peak MB", "ref": "full fine-tuning step peak MB",
              "grad_checkpointing": "on, both sides", "lora_mb_plain": plain["lora"], "full_mb_plain": plain["full"],
              "ratio_without_checkpointing": plain["lora"] / plain["full"],
              "memory_method": "weights + buffers + optimizer state, plus the peak allocated during the step "
                               "(torch.cuda max_memory_allocated / the CPU profiler's allocation trace)",
              "trainable_params_lora": params["lora"], "trainable_params_full": params["full"],
              "step_s_lora": times["lora"], "step_s_full": times["full"],
              "time_ratio": times["lora"] / times["full"], "goal": "ratio <= 0.40", "higher_is_better": False,
              "ours_compile": "per-block torch.compile" if ctx.compile else "eager"}
    return Result("lora_memory", peaks["lora"], peaks["full"], "MB", device.type, config)
