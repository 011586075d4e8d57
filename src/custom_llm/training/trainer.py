"""The training loop: gradient accumulation, mixed precision, curriculum, checkpoints, exact resume, DDP.

One optimizer step (:meth:`Trainer._train_step`) takes a global batch of B sequences of T tokens;
this rank trains on its slice of B / world_size sequences, split into ``grad_accum_steps``
micro-batches whose losses are averaged, so k micro-batches of B/k give the gradient of one batch
of B. Under DDP only the last micro-step all-reduces gradients (``no_sync`` on the others).

Everything a step depends on (weights, optimizer and scaler state, torch RNG, data position,
LayerDrop generator, curriculum state, pending metric sums) is saved in a checkpoint, so a resumed
run repeats the uninterrupted one bit for bit on the same hardware and precision.

Legend: B batch (sequences), T time (tokens per sequence), M micro-batch.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_io import load_state_into
from ..config import ModelConfig
from ..errors import UserError
from ..model import Transformer
from . import curriculum as cur
from .checkpoint import (decode_bytes, encode_bytes, latest_checkpoint, load_optimizer, load_trainer_state,
                         load_weights, remove_leftovers, rng_state, save_checkpoint, set_rng_state,
                         weights_are_finite)
from .config import TrainConfig, check_run_config, run_config_dict
from .distributed import OOM_HINT, Runtime, all_reduce_sum, barrier, init_runtime, is_out_of_memory
from .metrics import METRICS_FILE
from .optim import build_optimizer
from .plots import plot_losses
from .schedules import lr_multiplier

log = logging.getLogger("custom_llm.training")


class TrainingStopped(UserError):
    """The run stopped itself: too many consecutive non-finite steps."""


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


class _LossModule(nn.Module):
    """model.compute_loss as a forward(), so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.compute_loss(x, y)
        return out.loss, out.lm_loss


class Trainer:
    """Builds model, optimizer and data loader for a run directory, then :meth:`run` trains."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, run_dir: Path, dataset: Any,
                 tokenizer: Any = None, *, resume: bool = False, init_state: Optional[dict] = None,
                 progress: bool = True):
        from ..data import BatchLoader

        check_run_config(model_config, train_config)
        self.mc, self.tc = model_config, train_config
        self.run_dir, self.dataset, self.tokenizer, self.progress = Path(run_dir), dataset, tokenizer, progress
        self.rt: Runtime = init_runtime(train_config.device, train_config.precision)
        torch.manual_seed(train_config.seed)
        self.model = Transformer(model_config).to(self.rt.device)
        if init_state is not None:
            load_state_into(self.model, init_state, "--init checkpoint")
        tc = train_config
        self.optimizer = build_optimizer(self.model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2),
                                         tc.eps, tc.decay_embeddings)
        self.scaler = _make_scaler(self.rt)
        self.curriculum = cur.CurriculumState()
        self.step = self.tokens = self.bad_total = self.bad_run = 0
        self.pending: list[float] = []  # losses of steps since the last metrics row
        self.evals: list[dict] = []
        self._check_divisible()
        batch, seq_len, _ = self._shape()
        self.loader = BatchLoader(dataset.train, batch // self.rt.world_size, seq_len, seed=tc.seed,
                                  rank=self.rt.rank, world_size=self.rt.world_size)
        if resume and self.rt.is_main:
            remove_leftovers(self.run_dir)  # a save cut short by a crash; the last complete one stands
        barrier(self.rt)
        self.resumed_from = latest_checkpoint(self.run_dir) if resume else None
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self.net = self._wrap()
        self._signal: Optional[int] = None

    # --- setup ------------------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        """torch.compile (CUDA default) and DistributedDataParallel around the loss."""
        self.compiled = use_compile(self.tc, self.rt.device)
        if self.compiled:
            self.model.compile_blocks()
        net: nn.Module = _LossModule(self.model)
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            unused = self.mc.layerdrop > 0 or self.mc.n_experts > 0  # skipped blocks / idle experts get no grad
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=unused)
        return net

    def _check_divisible(self) -> None:
        parts = self.rt.world_size * self.tc.grad_accum_steps
        for batch in [self.tc.batch_size] + [stage.batch_size for stage in self.tc.curriculum]:
            if batch % parts:
                raise UserError(f"batch size {batch} must be divisible by world size ({self.rt.world_size}) x "
                                f"train.grad_accum_steps ({self.tc.grad_accum_steps})")

    def _shape(self) -> tuple[int, int, float]:
        """(global batch size, sequence length, learning-rate factor) of the current curriculum stage."""
        tc = self.tc
        if not tc.curriculum:
            return tc.batch_size, tc.seq_len or self.mc.max_seq_len, 1.0
        stage = tc.curriculum[self.curriculum.stage]
        factor = cur.batch_lr_factor(tc.curriculum_lr_rule, stage.batch_size, tc.batch_size) * stage.lr_scale
        return stage.batch_size, stage.seq_len, factor

    def state_dict(self) -> dict:
        """Everything besides weights and optimizer needed to continue exactly (trainer_state.json)."""
        return {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_total,
                "consecutive_bad_steps": self.bad_run, "pending_losses": self.pending, "evals": self.evals,
                "curriculum": self.curriculum.to_dict(), "loader": self.loader.state_dict(), "rng": rng_state(),
                "layerdrop_generator": encode_bytes(self.model.layerdrop_generator.get_state()),
                "world_size": self.rt.world_size, "precision": self.rt.precision}

    def _restore(self, ckpt: Path) -> None:
        load_weights(ckpt, self.model)
        scaler_state = load_optimizer(ckpt, self.optimizer)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        state = load_trainer_state(ckpt)
        self.step, self.tokens = state["step"], state["tokens"]
        self.bad_total, self.bad_run = state["bad_steps"], state["consecutive_bad_steps"]
        self.pending, self.evals = list(state["pending_losses"]), list(state["evals"])
        self.curriculum = cur.CurriculumState.from_dict(state["curriculum"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.model.layerdrop_generator.set_state(decode_bytes(state["layerdrop_generator"]))
        log.info("resuming from %s (step %d, %d tokens)", ckpt, self.step, self.tokens)

    # --- one optimizer step -------------------------------------------------------------------------
    def _train_step(self, stop_flag: bool) -> tuple[float, float, bool, bool]:
        """One optimizer step. Returns (mean LM loss over ranks, grad norm, whether the update was applied,
        whether any rank asked to stop)."""
        batch, seq_len, factor = self._shape()
        lr = self.tc.lr * factor * lr_multiplier(self.tc.schedule, self.step, self.tc.max_steps, self.tc.warmup_steps,
                                                 min_ratio=self.tc.min_lr_ratio, decay_fraction=self.tc.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = map(torch.from_numpy, self.loader.next_batch())  # (B/W, T): this rank's slice of the batch
        k = self.tc.grad_accum_steps
        micro = x.shape[0] // k
        lm_sum = torch.zeros((), device=self.rt.device)
        for i in range(k):
            xm = x[i * micro:(i + 1) * micro].to(self.rt.device, non_blocking=True)  # (M, T)
            ym = y[i * micro:(i + 1) * micro].to(self.rt.device, non_blocking=True)
            sync = i == k - 1 or not self.rt.distributed
            with (nullcontext() if sync else self.net.no_sync()):
                with self.rt.autocast():
                    loss, lm_loss = self.net(xm, ym)
                self.scaler.scale(loss / k).backward()
            lm_sum += lm_loss.detach().float()
        packed = torch.stack([lm_sum / k, torch.tensor(float(stop_flag), device=self.rt.device)])
        packed = all_reduce_sum(packed, self.rt)
        mean_loss, stop_any = packed[0].item() / self.rt.world_size, packed[1].item() > 0
        self.scaler.unscale_(self.optimizer)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        applied = math.isfinite(mean_loss) and (math.isfinite(grad_norm) or self.scaler.is_enabled())
        if applied:
            self.scaler.step(self.optimizer)  # fp16: skipped inside on overflow; the scaler then backs off
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += batch * seq_len
        self._lr = lr
        return mean_loss, grad_norm, applied, stop_any

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss (nats/token) over fixed, evenly spaced windows of the validation tokens."""
        val = self.dataset.val
        T = min(self.mc.max_seq_len, len(val) - 1)
        if T < 1:
            raise UserError("the validation split has fewer than 2 tokens; add data or raise train.val_fraction")
        bs, n_batches = self.tc.eval_batch_size, self.tc.eval_batches
        starts = np.linspace(0, len(val) - T - 1, bs * n_batches).astype(np.int64)
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        self.model.eval()
        for b in range(self.rt.rank, n_batches, self.rt.world_size):
            rows = [np.asarray(val[s:s + T + 1], dtype=np.int64) for s in starts[b * bs:(b + 1) * bs]]
            seqs = torch.from_numpy(np.stack(rows)).to(self.rt.device)  # (bs, T + 1)
            with self.rt.autocast():
                logits = self.model(seqs[:, :-1])  # (bs, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(float(seqs[:, 1:].numel()), dtype=torch.float64,
                                                              device=self.rt.device)])
        self.model.train()
        total = all_reduce_sum(total, self.rt)
        return float(total[0] / total[1])

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``max_steps`` (or until a signal or the time limit), saving and logging on the way."""
        try:
            return self._run()
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise UserError(OOM_HINT) from None
            raise

    def _run(self) -> TrainResult:
        from .loop import TrainingLoop

        return TrainingLoop(self).run()

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Write ``ckpt-<step>`` (rank 0) and refresh loss.png; every rank waits for it."""
        if not weights_are_finite(self.model):
            raise TrainingStopped(f"step {self.step}: the weights are not finite; no checkpoint written")
        path = None
        if self.rt.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scaler.state_dict(),
                                   self.state_dict(), run_config_dict(self.mc, self.tc), self.tokenizer,
                                   keep=self.tc.keep_checkpoints)
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / "loss.png", getattr(self, "reference_loss", None))
        barrier(self.rt)
        return path


def compile_toolchain_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot generate code for ``device`` on this machine, or None when it can.

    Inductor writes Triton kernels on CUDA and C++ on the CPU, and finds out that it cannot only at
    the first forward, deep in a training step; this asks up front.
    """
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # an older torch: nothing to ask, the first step will tell
        return None
    try:
        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - InvalidCxxCompiler and whatever probing the compiler raises
        return str(error).strip().split("\n", 1)[0] or type(error).__name__
    return None


def resolve_compile(requested: Optional[bool], device: torch.device, default: bool, flag: str, off_hint: str,
                    activity: str) -> bool:
    """Whether to compile: ``requested`` when set, else ``default``. Where the toolchain is missing,
    an explicit True is a UserError naming ``flag`` and a default True is dropped with a warning."""
    wanted = default if requested is None else requested
    problem = compile_toolchain_problem(device) if wanted else None
    if problem is None:
        return wanted
    if requested:
        raise UserError(f"{flag}: torch.compile cannot generate {device.type} code here ({problem}); {off_hint}")
    log.warning("%s without torch.compile: %s", activity, problem)
    return False


def use_compile(tc: TrainConfig, device: torch.device) -> bool:
    """``train.compile`` resolved for this device (default: on CUDA), see :func:`resolve_compile`."""
    return resolve_compile(tc.compile, device, device.type == "cuda", "train.compile",
                           "fix that or pass --train.compile false", "training")


def _make_scaler(rt: Runtime):
    """A gradient scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    enabled = rt.precision == "fp16"
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(rt.device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def train(model_config: ModelConfig, train_config: TrainConfig, run_dir: Path, dataset: Any, tokenizer: Any = None,
          *, resume: bool = False, init_state: Optional[dict] = None, progress: bool = True,
          reference_loss: Optional[float] = None) -> TrainResult:
    """Train a model on ``dataset`` (``.train`` and ``.val`` token arrays) into ``run_dir``."""
    trainer = Trainer(model_config, train_config, run_dir, dataset, tokenizer, resume=resume,
                      init_state=init_state, progress=progress)
    trainer.reference_loss = reference_loss
    return trainer.run()
