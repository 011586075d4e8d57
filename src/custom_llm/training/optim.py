"""Optimizers: AdamW with decay-aware parameter groups, and Lion (Chen et al. 2023).

Weight decay regularises matrices; it is left off vectors and scalars (norm weights, biases, ReZero
scales: every parameter with fewer than 2 dimensions) and, unless asked, off the token embedding
(which, when tied, is also the LM head).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lion")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: parameters that get weight decay and those that do not (each shared tensor once)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
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
                    eps: float = 1e-8, decay_embeddings: bool = False) -> torch.optim.Optimizer:
    """AdamW (the fused kernel where torch has one for the device, else foreach) or Lion over :func:`param_groups`.

    The fused kernel (torch >= 2.4 on CPU, earlier on CUDA) does each parameter's whole update in one
    pass; the foreach path runs about ten multi-tensor ops, each a pass over every parameter and its two
    moments: on the CPU that is 3-5x slower, a few percent of a small model's training step.
    """
    groups = param_groups(model, weight_decay, decay_embeddings)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    for kwargs in ({"fused": True}, {"foreach": True}):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        except (RuntimeError, TypeError):  # a build or device without that kernel: try the next one
            continue
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
