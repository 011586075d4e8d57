"""The objects one training run works with, built once: model, loss module (DDP-wrapped), optimizer,
gradient scaler and data loader, on the run's device and precision.

Legend: B batch, T time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint_io import load_state_into
from ..config import ModelConfig
from ..model import Transformer
from .compiling import use_compile
from .config import TrainConfig, check_run_config
from .distributed import Runtime, init_runtime
from .fsdp import shard_model
from .optim import build_optimizer
from .plan import check_batch_splits


class LossModule(nn.Module):
    """``model.compute_loss`` as a forward(), so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """x, y (M, T) -> (loss to backpropagate, LM loss, MoE expert load per layer)."""
        out = self.model.compute_loss(x, y)
        return out.loss, out.lm_loss, out.expert_load


@dataclass
class TrainingParts:
    """What a run trains with; nothing here changes from step to step except the tensors' values."""

    mc: ModelConfig
    tc: TrainConfig
    rt: Runtime
    model: Transformer
    net: nn.Module
    """The loss module, DistributedDataParallel-wrapped on more than one rank (under FSDP its model is sharded instead)."""
    optimizer: torch.optim.Optimizer
    scaler: Any
    """torch.amp.GradScaler, enabled for fp16 only."""
    loader: Any
    """data.BatchLoader over this rank's share of each global batch."""
    compiled: bool


def build_parts(mc: ModelConfig, tc: TrainConfig, train_tokens: Any, init_state: Optional[dict] = None) -> TrainingParts:
    """Seed, build the model (from ``init_state`` weights when given), optimizer, scaler and loader."""
    from ..data import BatchLoader

    check_run_config(mc, tc)
    rt = init_runtime(tc.device, tc.precision)
    check_batch_splits(tc, rt.world_size)
    torch.manual_seed(tc.seed)
    model = Transformer(mc).to(rt.device)
    if init_state is not None:
        load_state_into(model, init_state, "--init checkpoint")
    compiled = use_compile(tc.compile, rt.device)
    if compiled:
        model.compile_blocks()
    if tc.parallel == "fsdp" and rt.distributed:  # before the optimizer, which must see the sharded parameters
        shard_model(model, rt.device, rt.world_size, rt.precision, tc.reshard_after_forward)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps,
                                tc.decay_embeddings, muon_lr=tc.muon_lr, muon_momentum=tc.muon_momentum,
                                muon_weight_decay=tc.muon_weight_decay)
    first = tc.curriculum[0] if tc.curriculum else None
    batch, seq_len = (first.batch_size, first.seq_len) if first else (tc.batch_size, tc.seq_len or mc.max_seq_len)
    loader = BatchLoader(train_tokens, batch // rt.world_size, seq_len, seed=tc.seed, rank=rt.rank,
                         world_size=rt.world_size)
    return TrainingParts(mc, tc, rt, model, _wrap(LossModule(model), mc, tc, rt), optimizer, _make_scaler(rt), loader,
                         compiled)


def _wrap(net: nn.Module, mc: ModelConfig, tc: TrainConfig, rt: Runtime) -> nn.Module:
    """DistributedDataParallel on more than one rank (FSDP's model is already sharded: nothing to wrap).
    Blocks that LayerDrop skips get no gradient, so DDP must look for unused parameters then; MoE
    experts are stacked tensors that always get one."""
    if not rt.distributed or tc.parallel == "fsdp":
        return net
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=mc.layerdrop > 0)


def _make_scaler(rt: Runtime):
    """A gradient scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    enabled = rt.precision == "fp16"
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(rt.device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)
