"""What the next optimizer step does, as a pure function of the run's state and configs.

:func:`plan_step` is the one place that works out a step's global batch, sequence length, per-rank
micro-batches and learning-rate factor (curriculum stage, batch-size rule, schedule), and
:func:`batch_split_problem` the one place that says whether a global batch splits over ranks and
micro-steps. Nothing here touches a tensor, so each edge case is a unit test.

Legend: B global batch (sequences), T sequence length, W world size, k micro-steps, M micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import UserError
from .curriculum import batch_lr_factor
from .schedules import lr_multiplier

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .config import TrainConfig
    from .state import TrainState


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: B sequences of T tokens, as k micro-batches of M sequences on each of W ranks."""

    batch_size: int
    """Global batch B (all ranks, all micro-steps)."""
    seq_len: int
    """Tokens per sequence T."""
    micro_steps: int
    """Micro-steps k per optimizer step (gradient accumulation)."""
    micro_batch: int
    """Sequences M per micro-step on one rank: B / (W * k)."""
    lr_factor: float
    """Multiplier of every parameter group's base learning rate: stage factor x schedule."""

    @property
    def rank_batch(self) -> int:
        """Sequences one rank reads per optimizer step (k * M)."""
        return self.micro_steps * self.micro_batch

    @property
    def tokens(self) -> int:
        """Global tokens of the step (B * T)."""
        return self.batch_size * self.seq_len


def batch_split_problem(name: str, batch_size: int, world_size: int, micro_steps: int) -> Optional[str]:
    """Why ``batch_size`` does not split into ``world_size`` x ``micro_steps`` equal parts, or None."""
    if batch_size % (world_size * micro_steps) == 0:
        return None
    ranks = f"world size ({world_size}) x " if world_size > 1 else ""
    return f"{name} ({batch_size}) must be divisible by {ranks}train.grad_accum_steps ({micro_steps})"


def check_batch_splits(tc: "TrainConfig", world_size: int) -> None:
    """A UserError when the base batch or any curriculum stage's batch does not split over the ranks."""
    named = [("train.batch_size", tc.batch_size)] + [(f"train.curriculum[{i}].batch_size", s.batch_size)
                                                     for i, s in enumerate(tc.curriculum)]
    problems = [p for name, b in named if (p := batch_split_problem(name, b, world_size, tc.grad_accum_steps))]
    if problems:
        raise UserError("; ".join(problems))


def plan_step(state: "TrainState", mc: "ModelConfig", tc: "TrainConfig", world_size: int) -> StepPlan:
    """The plan of the step after ``state.step`` steps (batches assumed to split: :func:`check_batch_splits`)."""
    if tc.curriculum:
        stage = tc.curriculum[state.curriculum.stage]
        batch, seq_len = stage.batch_size, stage.seq_len
        factor = batch_lr_factor(tc.curriculum_lr_rule, stage.batch_size, tc.batch_size) * stage.lr_scale
    else:
        batch, seq_len, factor = tc.batch_size, tc.seq_len or mc.max_seq_len, 1.0
    factor *= lr_multiplier(tc.schedule, state.step, tc.max_steps, tc.warmup_steps, min_ratio=tc.min_lr_ratio,
                            decay_fraction=tc.decay_fraction)
    k = tc.grad_accum_steps
    return StepPlan(batch_size=batch, seq_len=seq_len, micro_steps=k, micro_batch=batch // (world_size * k),
                    lr_factor=factor)
