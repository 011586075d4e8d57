"""Everything a resumed run needs besides weights and optimizer: one dataclass, saved as one JSON object.

Exact resume is "this object round-trips": :meth:`TrainState.to_dict` is ``trainer_state.json``,
:meth:`TrainState.from_dict` reads it back (a missing or mistyped key is a UserError naming it), and
:func:`capture` / :func:`restore_generators` move the live random-number state (data loader, torch
RNGs, the LayerDrop generator) into and out of it at save and load time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from .checkpoint import decode_bytes, encode_bytes, rng_state, set_rng_state
from .curriculum import CurriculumState


@dataclass
class TrainState:
    """Where a run is: counters, curriculum, pending metrics, and (when captured) the generators' states."""

    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Training tokens consumed (global, all ranks)."""
    bad_steps: int = 0
    """Steps skipped so far because the loss or the gradients were not finite."""
    consecutive_bad_steps: int = 0
    """Skipped steps since the last applied one (the run stops at train.max_bad_steps)."""
    pending_losses: list[float] = field(default_factory=list)
    """Training losses of applied steps since the last metrics row (their mean is the row's loss)."""
    evals: list[dict] = field(default_factory=list)
    """Every validation measurement: {"step", "tokens", "val_loss"}."""
    curriculum: CurriculumState = field(default_factory=CurriculumState)
    """Curriculum stage and perplexity history."""
    loader: dict = field(default_factory=dict)
    """The data loader's state at the last capture (its position and generator)."""
    rng: dict = field(default_factory=dict)
    """Torch CPU (and CUDA) generator states at the last capture."""
    layerdrop_generator: str = ""
    """The model's LayerDrop generator state at the last capture (base64)."""
    world_size: int = 1
    """Ranks of the run that saved it (the global batch sequence does not depend on it)."""
    precision: str = "fp32"
    """Resolved precision of the run that saved it."""

    def to_dict(self) -> dict:
        """The JSON object of ``trainer_state.json``."""
        data = dataclasses.asdict(self)
        data["curriculum"] = self.curriculum.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "trainer_state.json") -> "TrainState":
        """Inverse of :meth:`to_dict`; a missing or malformed key is a UserError naming ``source``."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise UserError(f"{source}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
        try:
            return cls(step=int(data["step"]), tokens=int(data["tokens"]), bad_steps=int(data["bad_steps"]),
                       consecutive_bad_steps=int(data["consecutive_bad_steps"]),
                       pending_losses=[float(v) for v in data["pending_losses"]], evals=list(data["evals"]),
                       curriculum=CurriculumState.from_dict(data["curriculum"]), loader=dict(data["loader"]),
                       rng=dict(data["rng"]), layerdrop_generator=str(data["layerdrop_generator"]),
                       world_size=int(data["world_size"]), precision=str(data["precision"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: malformed value ({type(exc).__name__}: {exc})") from None


def capture(state: TrainState, loader: Any, model: torch.nn.Module) -> TrainState:
    """A copy of ``state`` with the live generators' states in it (what a checkpoint saves)."""
    return dataclasses.replace(state, loader=loader.state_dict(), rng=rng_state(),
                               layerdrop_generator=encode_bytes(model.layerdrop_generator.get_state()),
                               pending_losses=list(state.pending_losses), evals=list(state.evals))


def restore_generators(state: TrainState, loader: Any, model: torch.nn.Module) -> None:
    """Put the generators' states captured in ``state`` back into the loader, torch and the model."""
    loader.load_state_dict(state.loader)
    set_rng_state(state.rng)
    model.layerdrop_generator.set_state(decode_bytes(state.layerdrop_generator))
