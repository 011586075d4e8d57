"""The training loop, top to bottom: plan, step, evaluate, update the curriculum, log, save.

:func:`train` builds the run's parts (:mod:`.parts`), restores the newest checkpoint when resuming,
and runs :func:`train_loop`, whose body is the whole story of a step::

    plan   = plan_step(state, ...)                 # batch, length, micro-batches, lr   (plan.py)
    result = train_step(parts, plan, x, y, ...)    # forward/backward/update            (step.py)
    state  = after_step(state, plan, result)       # counters and pending losses
    val    = evaluate(parts, ...) when due         # validation loss                    (step.py)
    curriculum.update(...)                         # next stage?                        (curriculum.py)
    log.row(state, ...) when due                   # metrics.jsonl, progress            (metrics.py)
    save_run_checkpoint(...) when due              # ckpt-<step>/                       (checkpoint.py)

Only this loop changes :class:`~.state.TrainState`; evaluation, logging and checkpointing receive
it and read it. Everything a step depends on (weights, optimizer and scaler state, torch RNG, data
position, LayerDrop generator, curriculum, pending metrics) is saved in a checkpoint, so a resumed
run repeats the uninterrupted one bit for bit on the same hardware and precision.

Signals: the first SIGINT/SIGTERM lets the current step finish, saves, and ends the run with exit
code 0; a second one exits at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..checkpoint_io import is_sharded
from ..errors import UserError
from ..fsutil import run_dir_lock
from ..model.loss import perplexity
from . import curriculum as cur
from .checkpoint import (latest_checkpoint, load_optimizer, load_trainer_state, load_weights, remove_leftovers,
                         save_checkpoint, weights_are_finite)
from .config import TrainConfig, run_config_dict
from .dcp import load_sharded_checkpoint, refuse_full_into_sharded, save_sharded_checkpoint, weights_finite_everywhere
from .distributed import OOM_HINT, barrier, is_out_of_memory, peak_flops
from .metrics import METRICS_FILE, RunLog
from .parts import TrainingParts, build_parts
from .plan import StepPlan, plan_step
from .plots import plot_losses
from .state import TrainState, capture, restore_generators
from .step import StepResult, evaluate, train_step

log = logging.getLogger("custom_llm.training")


class TrainingStopped(UserError):
    """The run stopped itself: too many consecutive non-finite steps, or weights that are not finite."""


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run reports."""

    run_dir: Path
    step: int
    tokens: int
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    stopped: str
    """'done' (max_steps reached), 'signal' (SIGINT/SIGTERM) or 'time_limit'."""
    bad_steps: int
    """Steps skipped because the loss or the gradients were not finite."""


def train(model_config: ModelConfig, train_config: TrainConfig, run_dir: Path, dataset: Any, tokenizer: Any = None,
          *, resume: bool = False, init_state: Optional[dict] = None, progress: bool = True,
          reference_loss: Optional[float] = None) -> TrainResult:
    """Train a model on ``dataset`` (``.train`` and ``.val`` token arrays) into ``run_dir``."""
    parts = build_parts(model_config, train_config, dataset.train, init_state)
    return train_loop(parts, Path(run_dir), dataset, tokenizer, resume=resume, progress=progress,
                      reference_loss=reference_loss)


def train_loop(parts: TrainingParts, run_dir: Path, dataset: Any, tokenizer: Any = None, *, resume: bool = False,
               progress: bool = True, reference_loss: Optional[float] = None) -> TrainResult:
    """Train ``parts`` from a fresh start or the newest checkpoint in ``run_dir`` to ``max_steps``
    (or until a signal or the time limit), logging and saving on the way. Rank 0 owns ``run_dir``
    (its lock) for the whole run, so a second run into the same directory is refused."""
    with run_dir_lock(run_dir) if parts.rt.is_main else nullcontext():
        return _train_loop(parts, Path(run_dir), dataset, tokenizer, resume, progress, reference_loss)


def _train_loop(parts: TrainingParts, run_dir: Path, dataset: Any, tokenizer: Any, resume: bool, progress: bool,
                reference_loss: Optional[float]) -> TrainResult:
    tc, rt = parts.tc, parts.rt
    state, resumed_from = start_state(parts, run_dir, resume)
    saver = _Saver(parts, run_dir, tokenizer, reference_loss)
    peak, peak_note = peak_flops(rt)
    if rt.is_main:
        _log_start(parts, peak_note)
    if resumed_from is not None and state.step >= tc.max_steps:  # nothing to train, nothing to write
        log.info("%s is already at step %d, not before --train.max_steps %d: nothing to do (raise max_steps "
                 "to train on)", resumed_from, state.step, tc.max_steps)
        val = state.evals[-1]["val_loss"] if state.evals else None
        return TrainResult(run_dir, state.step, state.tokens, val, resumed_from, "done", state.bad_steps)
    run_log = RunLog(run_dir, is_main=rt.is_main, start_step=state.step, start_tokens=state.tokens,
                     max_steps=tc.max_steps, resumed=resumed_from is not None, progress=progress, peak=peak,
                     world_size=rt.world_size, flops_per_token=parts.model.flops_per_token)
    stops = _StopRequests(tc.time_limit)
    stopped, last_eval, lr = "done", None, None
    try:
        with stops:
            while state.step < tc.max_steps:
                plan = plan_step(state, parts.mc, tc, rt.world_size)
                parts.loader.set_shape(plan.rank_batch, plan.seq_len)
                x, y, *extra = parts.loader.next_batch()  # (k * M, T): this rank's rows of the global batch
                result = train_step(parts, plan, x, y, stops.requested(), extra)
                state, lr = after_step(state, plan, result), tc.lr * plan.lr_factor
                row: dict = {}
                if tc.eval_every and state.step % tc.eval_every == 0:
                    row = _measure(parts, dataset, state)
                    last_eval = state.step
                transition = cur.update(state.curriculum, tc.curriculum, state.step, state.tokens,
                                        row.get("val_loss"), patience=tc.curriculum_patience,
                                        threshold=tc.curriculum_threshold)
                if transition is not None:
                    row["stage_change"] = {k: transition[k] for k in ("from", "to", "reason")}
                    _log_transition(transition, plan_step(state, parts.mc, tc, rt.world_size))
                if row or state.step % tc.log_every == 0 or not result.applied:
                    run_log.row(state, lr, plan.seq_len, result.expert_load, row)
                    state.pending_losses = []
                run_log.advance()
                _check_bad_steps(state, result, tc, rt.precision)
                if result.stop or (not rt.distributed and stops.requested()):
                    stopped = "signal" if stops.signal is not None else "time_limit"
                    break
                if tc.save_every and state.step % tc.save_every == 0:
                    saver.save(state)
            if stopped != "signal" and last_eval != state.step:
                run_log.row(state, lr, parts.loader.seq_len, {}, _measure(parts, dataset, state))
                state.pending_losses = []
            if saver.last_saved != state.step:
                saver.save(state)
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise UserError(OOM_HINT) from None
        raise
    finally:
        run_log.close()
    if stopped != "done":
        log.info("stopped early (%s) at step %d; continue with --resume", stopped, state.step)
    val = state.evals[-1]["val_loss"] if state.evals else None
    return TrainResult(run_dir, state.step, state.tokens, val, run_dir / f"ckpt-{state.step}", stopped,
                       state.bad_steps)


def start_state(parts: TrainingParts, run_dir: Path, resume: bool) -> tuple[TrainState, Optional[Path]]:
    """A fresh state, or the newest complete checkpoint's (weights, optimizer and generators restored)."""
    if resume and parts.rt.is_main:
        remove_leftovers(run_dir)  # a save cut short by a crash; the last complete one stands
    barrier(parts.rt)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        return TrainState(world_size=parts.rt.world_size, precision=parts.rt.precision), None
    if is_sharded(ckpt):  # an FSDP run's DCP folder, saved by any number of ranks (dcp.py)
        scaler_state = load_sharded_checkpoint(ckpt, parts.model, parts.optimizer)
    else:
        refuse_full_into_sharded(ckpt, parts.tc, parts.rt)
        load_weights(ckpt, parts.model)
        scaler_state = load_optimizer(ckpt, parts.optimizer)
    if scaler_state:
        parts.scaler.load_state_dict(scaler_state)
    state = TrainState.from_dict(load_trainer_state(ckpt), str(ckpt / "trainer_state.json"))
    restore_generators(state, parts.loader, parts.model)
    log.info("resuming from %s (step %d, %d tokens)", ckpt, state.step, state.tokens)
    return dataclasses.replace(state, world_size=parts.rt.world_size, precision=parts.rt.precision), ckpt


def after_step(state: TrainState, plan: StepPlan, result: StepResult) -> TrainState:
    """The state after one optimizer step: counters moved on, the loss kept for the next metrics row."""
    if result.applied:
        return dataclasses.replace(state, step=state.step + 1, tokens=state.tokens + plan.tokens,
                                   consecutive_bad_steps=0, pending_losses=state.pending_losses + [result.loss])
    log.warning("step %d skipped: non-finite loss or gradient (loss %.4g)", state.step + 1, result.loss)
    return dataclasses.replace(state, step=state.step + 1, tokens=state.tokens + plan.tokens,
                               bad_steps=state.bad_steps + 1, consecutive_bad_steps=state.consecutive_bad_steps + 1)


def _check_bad_steps(state: TrainState, result: StepResult, tc: TrainConfig, precision: str) -> None:
    if state.consecutive_bad_steps < tc.max_bad_steps:
        return
    hint = "lower --train.lr" + (" or use --precision bf16/fp32" if precision == "fp16" else "")
    raise TrainingStopped(f"stopping at step {state.step}: {state.consecutive_bad_steps} consecutive steps had a "
                          f"non-finite loss or gradient (last loss {result.loss:.4g}, grad norm "
                          f"{result.grad_norm:.4g}); {hint}")


def _measure(parts: TrainingParts, dataset: Any, state: TrainState) -> dict:
    """Measure validation loss now (``dataset.evaluate(parts)`` when the dataset has its own, as fine-tuning's
    masked loss over held-out conversations); record it in ``state.evals`` and return the row fields."""
    with _eager_on_the_cpu(parts):
        val = dataset.evaluate(parts) if hasattr(dataset, "evaluate") else evaluate(parts, dataset.val)
    state.evals.append({"step": state.step, "tokens": state.tokens, "val_loss": val})
    return {"val_loss": val, "val_ppl": perplexity(val)}


def _eager_on_the_cpu(parts: TrainingParts) -> AbstractContextManager:
    """Compiled CPU training evaluates eagerly: an evaluation (eval mode, no gradients) is another graph for
    inductor to compile, ~5 s on 2 cores for the shakespeare-char-cpu model, more than its 20 forwards take."""
    if not parts.compiled or parts.rt.device.type != "cpu":
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


class _Saver:
    """Writes ``ckpt-<step>`` (rank 0; under FSDP every rank its shards) and refreshes loss.png; every rank waits for it."""

    def __init__(self, parts: TrainingParts, run_dir: Path, tokenizer: Any, reference_loss: Optional[float]):
        self.parts, self.run_dir, self.tokenizer, self.reference_loss = parts, run_dir, tokenizer, reference_loss
        self.last_saved: Optional[int] = None

    def save(self, state: TrainState) -> None:
        parts = self.parts
        sharded = parts.tc.parallel == "fsdp"
        if not (weights_finite_everywhere(parts.model, parts.rt) if sharded else weights_are_finite(parts.model)):
            raise TrainingStopped(f"step {state.step}: the weights are not finite; no checkpoint written")
        if sharded:  # every rank writes its own shards; rank 0 the JSON files (dcp.py)
            save_sharded_checkpoint(self.run_dir, state.step, parts.model, parts.optimizer, parts.scaler.state_dict(),
                                    capture(state, parts.loader, parts.model).to_dict(),
                                    run_config_dict(parts.mc, parts.tc), self.tokenizer, parts.tc.keep_checkpoints,
                                    parts.rt)
        if parts.rt.is_main and not sharded:
            snapshot = capture(state, parts.loader, parts.model)
            save_checkpoint(self.run_dir, state.step, parts.model, parts.optimizer, parts.scaler.state_dict(),
                            snapshot.to_dict(), run_config_dict(parts.mc, parts.tc), self.tokenizer,
                            keep=parts.tc.keep_checkpoints)
        if parts.rt.is_main:
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / "loss.png", self.reference_loss)
        barrier(parts.rt)
        self.last_saved = state.step


class _StopRequests:
    """SIGINT/SIGTERM handlers (main thread only) and the time limit: whether the run should stop."""

    def __init__(self, time_limit_minutes: Optional[float]):
        self.limit = time_limit_minutes
        self.signal: Optional[int] = None
        self.start = time.time()
        self.previous: dict = {}

    def __enter__(self) -> "_StopRequests":
        self.start = time.time()
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        log.info("received %s: finishing this step, saving a checkpoint, then stopping (send again to abort)",
                 signal.Signals(signum).name)

    def requested(self) -> bool:
        return self.signal is not None or (self.limit is not None and time.time() - self.start >= 60 * self.limit)


def _log_start(parts: TrainingParts, peak_note: str) -> None:
    params = parts.model.num_params()
    precision = parts.rt.precision
    if precision == "bf16" and parts.rt.device.type == "cpu" and parts.tc.precision == "auto":
        precision += " (auto: this CPU has AMX; --precision fp32 trains in fp32)"
    log.info("model: %.2fM parameters (%.2fM active), %s on %s x%d, %s; MFU peak: %s", params["total"] / 1e6,
             params["active"] / 1e6, precision, parts.rt.device.type, parts.rt.world_size,
             "torch.compile" if parts.compiled else "eager", peak_note)


def _log_transition(transition: dict, next_plan: StepPlan) -> None:
    log.info("curriculum: stage %d -> %d at step %d (%s): batch %d, seq_len %d", transition["from"],
             transition["to"], transition["step"], transition["reason"], next_plan.batch_size, next_plan.seq_len)
