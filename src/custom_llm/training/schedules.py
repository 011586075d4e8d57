"""Learning-rate schedules as pure functions of the step (no hidden state, easy to test at the edges).

Each returns the multiplier applied to the peak learning rate at ``step`` (0-based) of a run of
``total_steps`` optimizer steps; the trainer sets ``lr = peak_lr * multiplier * curriculum_scale``.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    Cosine decay as in Loshchilov & Hutter 2017 (SGDR, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2,
                        min_ratio: float = 0.0) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup, a constant plateau, then a linear
    decay to ``min_ratio`` over the last ``decay_fraction`` of the run."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


def constant(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then a constant learning rate."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int, *, min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Dispatch on the schedule's name (one of :data:`SCHEDULES`)."""
    if name == "cosine":
        return warmup_cosine(step, total_steps, warmup_steps, min_ratio)
    if name == "wsd":
        return warmup_stable_decay(step, total_steps, warmup_steps, decay_fraction, min_ratio)
    if name == "constant":
        return constant(step, total_steps, warmup_steps)
    raise ValueError(f"unknown schedule {name!r}")
