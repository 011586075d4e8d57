"""One optimizer step and one validation pass, as functions of the run's parts.

:func:`train_step` takes this rank's rows of a global batch (B / W sequences), splits them into the
plan's k micro-batches whose losses are averaged, so k micro-batches of M give the gradient of one
batch of k * M; under DDP only the last micro-step all-reduces gradients (``no_sync`` on the others).
A step whose loss or gradient is not finite is not applied.

Legend: B global batch, W world size, T time, M micro-batch, V vocabulary.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .distributed import all_reduce_sum
from .fsdp import clip_grad_norm, no_gradient_sync
from .parts import TrainingParts
from .plan import StepPlan


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float
    """Mean LM loss over ranks and micro-batches (nats/token)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    applied: bool
    """False when the loss or the gradients were not finite (the update was skipped)."""
    stop: bool
    """Whether any rank asked to stop (a signal or the time limit)."""
    expert_load: dict[int, torch.Tensor]
    """Per MoE layer that ran in the last micro-batch, the fraction of token-slots each expert got (E,)."""


def train_step(parts: TrainingParts, plan: StepPlan, x: np.ndarray, y: np.ndarray, stop_requested: bool,
               extra: tuple = ()) -> StepResult:
    """One optimizer step on this rank's rows x, y (k * M, T) at the plan's learning rate. ``extra`` arrays
    (k * M, T), such as fine-tuning's document ids, are split alike and passed to the loss module after y."""
    rt, tc, k, M = parts.rt, parts.tc, plan.micro_steps, plan.micro_batch
    for group in parts.optimizer.param_groups:
        group["lr"] = group["base_lr"] * plan.lr_factor
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    extra = [torch.from_numpy(e) for e in extra]
    lm_sum = torch.zeros((), device=rt.device)
    for i in range(k):
        xm = x[i * M:(i + 1) * M].to(rt.device, non_blocking=True)  # (M, T)
        ym = y[i * M:(i + 1) * M].to(rt.device, non_blocking=True)
        em = [e[i * M:(i + 1) * M].to(rt.device, non_blocking=True) for e in extra]
        sync = i == k - 1 or not rt.distributed
        with nullcontext() if sync else no_gradient_sync(parts.net):
            with rt.autocast():
                loss, lm_loss, expert_load = parts.net(xm, ym, *em)
            parts.scaler.scale(loss / k).backward()
        lm_sum += lm_loss.detach().float()
    packed = all_reduce_sum(torch.stack([lm_sum / k, torch.tensor(float(stop_requested), device=rt.device)]), rt)
    mean_loss, stop_any = packed[0].item() / rt.world_size, packed[1].item() > 0
    parts.scaler.unscale_(parts.optimizer)
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = float(clip_grad_norm(parts.model.parameters(), clip))  # over every rank's shards under FSDP
    applied = math.isfinite(mean_loss) and (math.isfinite(grad_norm) or parts.scaler.is_enabled())
    if applied:
        parts.scaler.step(parts.optimizer)  # fp16: skipped inside on overflow; the scaler then backs off
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, grad_norm, applied, stop_any, expert_load)


@torch.no_grad()
def evaluate(parts: TrainingParts, val_tokens: np.ndarray) -> float:
    """Mean validation LM loss (nats/token) over fixed, evenly spaced windows of the validation tokens."""
    rt, tc, model = parts.rt, parts.tc, parts.model
    T = min(parts.mc.max_seq_len, len(val_tokens) - 1)
    if T < 1:
        raise UserError("the validation split has fewer than 2 tokens; add data or raise train.val_fraction")
    bs, n_batches = tc.eval_batch_size, tc.eval_batches
    starts = np.linspace(0, len(val_tokens) - T - 1, bs * n_batches).astype(np.int64)
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    model.eval()
    for b in range(rt.rank, -(-n_batches // rt.world_size) * rt.world_size, rt.world_size):
        # every rank runs the same number of forwards (FSDP gathers weights collectively); extras count 0
        weight, b = float(b < n_batches), min(b, n_batches - 1)
        rows = [np.asarray(val_tokens[s:s + T + 1], dtype=np.int64) for s in starts[b * bs:(b + 1) * bs]]
        seqs = torch.from_numpy(np.stack(rows)).to(rt.device)  # (bs, T + 1)
        with rt.autocast():
            logits = model(seqs[:, :-1])  # (bs, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum")
        count = torch.tensor(float(seqs[:, 1:].numel()), dtype=torch.float64, device=rt.device)
        total += weight * torch.stack([loss.double(), count])
    model.train()
    total = all_reduce_sum(total, rt)
    return float(total[0] / total[1])
