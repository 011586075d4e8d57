"""Adaptive curriculum: stages of (sequence length, batch size, learning-rate scale).

Training starts on short sequences and small batches, which are cheap and give many updates early
(sequence-length warmup, Li et al. 2022, "The Stability-Efficiency Dilemma"), and moves on when the
current stage stops paying off. Validation perplexity is measured every ``eval_every`` steps; the
decision to advance is the pure function :func:`advance_reason` of the stage's metric history, so it
is unit-tested at its edges and replays identically after a resume.

Learning rate on a batch-size change (:func:`batch_lr_factor`): rule ``sqrt`` multiplies the peak
learning rate by sqrt(B_stage / B_base), the square-root scaling that keeps Adam's update noise
constant (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms");
``linear`` uses B_stage / B_base (Goyal et al. 2017, for SGD); ``none`` keeps it. B_base is
``train.batch_size``. The stage's own ``lr_scale`` multiplies on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..model.loss import perplexity

LR_RULES = ("sqrt", "linear", "none")


@dataclass
class CurriculumStage:
    """One curriculum stage."""

    seq_len: int
    """Training sequence length in this stage (at most model.max_seq_len)."""
    batch_size: int
    """Global batch size (sequences per optimizer step) in this stage."""
    lr_scale: float = 1.0
    """Extra multiplier on the learning rate in this stage (after the batch-size rule)."""
    target_ppl: Optional[float] = None
    """Advance as soon as validation perplexity falls to this value or below; None: no target."""
    max_steps: Optional[int] = None
    """Advance after this many steps in the stage whatever the metrics say; None: no bound."""


def advance_reason(stage: CurriculumStage, ppl_history: list[float], steps_in_stage: int, *,
                   patience: int, threshold: float, is_last: bool) -> Optional[str]:
    """Why the run should leave ``stage`` now ("max_steps", "target", "plateau"), or None to stay.

    ``ppl_history``: validation perplexities measured during this stage, oldest first. A plateau
    means the best of the last ``patience`` measurements improved on the best before them by no
    more than the relative ``threshold`` (0.01 = 1%). The last stage never advances.
    """
    if is_last:
        return None
    if stage.max_steps is not None and steps_in_stage >= stage.max_steps:
        return "max_steps"
    if ppl_history and stage.target_ppl is not None and ppl_history[-1] <= stage.target_ppl:
        return "target"
    if len(ppl_history) > patience:
        best_before = min(ppl_history[:-patience])
        best_recent = min(ppl_history[-patience:])
        if best_recent > best_before * (1 - threshold):
            return "plateau"
    return None


def batch_lr_factor(rule: str, batch_size: int, base_batch_size: int) -> float:
    """Learning-rate multiplier for a stage batch size under ``rule`` (see the module docstring)."""
    if rule == "sqrt":
        return math.sqrt(batch_size / base_batch_size)
    if rule == "linear":
        return batch_size / base_batch_size
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown lr rule {rule!r}")


@dataclass
class CurriculumState:
    """Where the run is in its curriculum; saved in trainer_state.json for exact resume."""

    stage: int = 0
    """Index of the current stage."""
    stage_start_step: int = 0
    """Global step at which the current stage began."""
    ppl_history: list[float] = field(default_factory=list)
    """Validation perplexities measured in the current stage."""
    transitions: list[dict] = field(default_factory=list)
    """Every transition so far: {"step", "tokens", "from", "to", "reason"}."""

    def to_dict(self) -> dict:
        return {"stage": self.stage, "stage_start_step": self.stage_start_step,
                "ppl_history": list(self.ppl_history), "transitions": list(self.transitions)}

    @classmethod
    def from_dict(cls, data: dict) -> "CurriculumState":
        return cls(stage=int(data["stage"]), stage_start_step=int(data["stage_start_step"]),
                   ppl_history=[float(p) for p in data["ppl_history"]], transitions=list(data["transitions"]))


def update(state: CurriculumState, stages: list[CurriculumStage], step: int, tokens: int,
           val_loss: Optional[float], *, patience: int, threshold: float) -> Optional[dict]:
    """Called after every optimizer step (``step`` steps done), with the validation loss when one was
    measured at this step; moves to the next stage when :func:`advance_reason` says so and returns the
    transition record, else None."""
    if not stages:
        return None
    if val_loss is not None:
        state.ppl_history.append(perplexity(val_loss))
    stage = stages[state.stage]
    reason = advance_reason(stage, state.ppl_history, step - state.stage_start_step, patience=patience,
                            threshold=threshold, is_last=state.stage == len(stages) - 1)
    if reason is None:
        return None
    transition = {"step": step, "tokens": tokens, "from": state.stage, "to": state.stage + 1, "reason": reason}
    state.stage += 1
    state.stage_start_step = step
    state.ppl_history = []
    state.transitions.append(transition)
    return transition
