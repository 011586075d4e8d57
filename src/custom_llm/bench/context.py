"""What every case receives: device, sizes, flags; plus the helpers cases share (models, batches, steps)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import Transformer
from .sizes import Sizes

LR, BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.1


@dataclass
class Context:
    """The run's device, sizes and switches."""

    device: torch.device
    sizes: Sizes
    compile: bool
    """Compile our model (per block, torch.compile) in training cases and the decode step; the default on CUDA."""
    ref_compile: bool = False
    """Also compile the Hugging Face reference (its best case, instead of its plain eager forward)."""
    seed: int = 0
    quick: bool = False
    """Tiny sizes, one repetition: a smoke test of the machinery, not a measurement."""
    data: Optional[str] = None
    """A text file for cases that train on real text (shakespeare_char); None: its default location."""


def build_model(fields: dict, device: torch.device, seed: int = 0, **overrides) -> Transformer:
    """Our Transformer from ModelConfig fields, seeded, on ``device``."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**fields, **overrides})).to(device)


def random_batch(vocab_size: int, batch: int, seq_len: int, device: torch.device, seed: int = 0):
    """(x, y) int64 (B, T) token ids, y being x shifted by one (as the data loader gives them)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer both sides use: AdamW, fused where torch has the kernel (CUDA; CPU since torch 2.4),
    else foreach, as the trainer picks (and as transformers' Trainer defaults to on torch >= 2.8)."""
    from ..training.optim import make_adamw

    return make_adamw(model.parameters(), device, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def ours_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Our training loss: cross-entropy through the fused LM head, plus MoE auxiliary losses."""
    return model.compute_loss(x, y).loss


def hf_loss(hf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference loss: HF logits, fp32 cross-entropy (as transformers' ForCausalLMLoss), plus the
    load-balancing loss of MoE models (``output_router_logits``) at the same coefficient as ours."""
    moe = hasattr(hf.config, "num_local_experts") or hasattr(hf.config, "num_experts")
    out = hf(input_ids=x, output_router_logits=True) if moe else hf(input_ids=x)
    logits = out.logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    if moe and getattr(out, "aux_loss", None) is not None:
        loss = loss + hf.config.router_aux_loss_coef * out.aux_loss
    return loss


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device,
               dtype: Optional[torch.dtype]) -> Callable[[], None]:
    """One full training step (forward, backward, optimizer) as a zero-argument function."""

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")
