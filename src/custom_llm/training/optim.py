"""Optimizers: AdamW with decay-aware parameter groups, Lion (Chen et al. 2023), and Muon (see muon.py).

Weight decay regularises matrices; it is left off vectors and scalars (norm weights, biases, ReZero
scales: every parameter with fewer than 2 dimensions) and, unless asked, off the token embedding
(which, when tied, is also the LM head).

Every group carries ``base_lr``, its peak learning rate; a training loop sets each step's
``group["lr"] = group["base_lr"] * schedule multiplier``, so Muon's matrices (lr ~0.02) and its
AdamW groups (the run's lr) follow the same schedule at their own scale.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

from .muon import Muon

OPTIMIZERS = ("adamw", "lion", "muon")


@functools.lru_cache(maxsize=None)
def adamw_fused_available(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CUDA; CPU since torch 2.4): the one place
    the fused-or-foreach choice is made (foreach otherwise).

    The fused kernel does each parameter's whole update in one pass; the foreach path runs about ten
    multi-tensor ops, each a pass over every parameter and its two moments: on the CPU that is 3-5x
    slower, a few percent of a small model's training step.
    """
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, TypeError):  # a build, device or torch version without the kernel
        return False
    return True


def make_adamw(params: Iterable, device: torch.device, **hyper: Any) -> torch.optim.AdamW:
    """torch's AdamW over ``params`` (tensors or groups), fused where :func:`adamw_fused_available`, else foreach."""
    kernel = {"fused": True} if adamw_fused_available(torch.device(device)) else {"foreach": True}
    return torch.optim.AdamW(params, **hyper, **kernel)


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon trains: every matrix (or stack of expert matrices) inside the blocks except
    routers (router, its noise projection, the shared-expert gate), which stay with AdamW."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        return []
    routing = {"router", "noise", "shared_expert_gate"}
    routers = {id(p) for name, module in blocks.named_modules() if name.rsplit(".", 1)[-1] in routing
               for p in module.parameters()}
    matrices, seen = [], set()
    for param in blocks.parameters():
        if param.requires_grad and param.ndim >= 2 and id(param) not in routers and id(param) not in seen:
            seen.add(id(param))
            matrices.append(param)
    return matrices


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Two groups: parameters that get weight decay and those that do not (each shared tensor once),
    leaving out ``exclude``."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], {id(p) for p in exclude}
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = id(param) in embedding_ids
        if param.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Lion(torch.optim.Optimizer):
    """Lion, "EvoLved Sign Momentum" (Chen et al. 2023, Algorithm 2).

    For each parameter θ with gradient g and momentum m::

        c = β1·m + (1 − β1)·g            interpolation used for the update direction
        θ ← θ − lr·(sign(c) + λ·θ)        decoupled weight decay, as in AdamW
        m ← β2·m + (1 − β2)·g            momentum tracked with the second β

    Typical settings use a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be > 0 (got {lr})")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lion: betas must be in [0, 1) (got {betas})")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                direction = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(direction, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, decay_embeddings: bool = False, *, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (:func:`make_adamw`), Lion, or Muon over :func:`param_groups`; every group gets ``base_lr``.

    ``muon``: the block matrices (:func:`muon_matrices`) in one Muon group (``muon_lr``,
    ``muon_momentum`` Nesterov, ``muon_weight_decay``); everything else in the two AdamW groups at
    ``lr``, ``betas``, ``eps`` and ``weight_decay``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}")
    device = next(model.parameters()).device
    if name == "muon":
        matrices = muon_matrices(model)
        groups = [{"params": matrices, "lr": muon_lr, "momentum": muon_momentum, "weight_decay": muon_weight_decay,
                   "muon": True}]
        groups += [dict(g, lr=lr, muon=False) for g in param_groups(model, weight_decay, decay_embeddings, matrices)]
        optimizer: torch.optim.Optimizer = Muon(groups, lr=muon_lr, betas=betas, eps=eps,
                                                adamw_fused=adamw_fused_available(device))
    elif name == "lion":
        optimizer = Lion(param_groups(model, weight_decay, decay_embeddings), lr=lr, betas=betas,
                         weight_decay=weight_decay)
    else:
        optimizer = make_adamw(param_groups(model, weight_decay, decay_embeddings), device, lr=lr, betas=betas,
                               eps=eps, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer
