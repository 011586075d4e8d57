"""Muon: momentum whose update matrices are orthogonalised by a Newton-Schulz iteration.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; the optimizer of
modded-nanogpt's speed runs and of nanochat) trains the weight matrices of the blocks. For a matrix W
(R rows = outputs, C columns = inputs) with gradient G and momentum buffer M::

    M ← μ·M + (1 − μ)·G                          momentum, μ = 0.95
    U ← (1 − μ)·G + μ·M    (Nesterov; plain: U = M)
    O ← newton_schulz(U) ≈ P·Qᵀ   where U = P·S·Qᵀ  every singular value pushed to about 1
    W ← W·(1 − lr·λ) − lr·√max(1, R/C)·O          decoupled weight decay λ, shape factor

Orthogonalising makes the step equally large in every direction the gradient spans, so the rare
directions that AdamW's per-coordinate scaling leaves small are learned too (Jordan's explanation;
Bernstein & Newhouse 2024 derive it as steepest descent under the spectral norm). The shape factor
(Jordan's) gives tall matrices the larger step their wider output space needs.

Muon is for hidden matrices only: the embedding, the LM head, vectors and scalars (norms, biases,
ReZero scales) and routers are trained by AdamW, as in the published recipes. One :class:`Muon`
holds both kinds of parameter group (``muon=True`` or ``False``), so a training loop, a gradient
scaler and a checkpoint see one optimizer. Experts' stacked weights (E, R, C) are E matrices.

Distributed: every rank keeps the same momentum buffers (DDP hands every rank the same averaged
gradient), but each orthogonalises only its share of the matrices, assigned once at construction to
balance the work; the results are exchanged with one ``all_gather`` per step, so every rank applies
the same update as one process would, and the Newton-Schulz work is divided by the world size.

Legend: N matrices in a stack, E experts, R rows, C columns (R <= C after orientation).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of the quintic p(x) = a·x + b·x³ + c·x⁵ applied to every singular value per iteration
(Jordan et al. 2024): the steepest slope at 0 (p'(0) = 3.4445) for which five iterations keep every
singular value above about 1e-3 of the largest inside the band [0.5, 1.5] instead of converging to 1."""


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G (..., R, C): P·S·Qᵀ -> P·S'·Qᵀ, S' in about [0.5, 1.5].

    G is first scaled to Frobenius norm 1, which puts every singular value in [0, 1]; each iteration
    X <- a·X + (b·A + c·A²)·X with A = X·Xᵀ maps every singular value x to p(x) (see NS_COEFFICIENTS)
    and keeps the singular vectors. Works on the smaller Gram matrix (a tall G is transposed), in
    ``dtype`` (bf16 where the hardware multiplies it fast: the iteration tolerates its precision).
    Returns ``dtype``.
    """
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).float()  # (..., R, C), R <= C
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)).to(dtype).reshape(-1, *X.shape[-2:])  # (N, R, C)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)  # (N, R, R)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.baddbmm(X, B, X, beta=a)  # a·X + B·X
    X = X.reshape(*G.shape[:-2], *X.shape[-2:])
    return X.mT if tall else X


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies bf16 matrices natively (CUDA with bf16; CPUs with AVX512-BF16 or
    AMX), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return torch.bfloat16 if any(probe is not None and probe() for probe in probes) else torch.float32


def shape_scale(param: torch.Tensor) -> float:
    """Jordan's factor √max(1, R/C) of a (..., R, C) weight."""
    return max(1.0, param.shape[-2] / param.shape[-1]) ** 0.5


def assign_owners(params: list[torch.Tensor], world_size: int) -> list[int]:
    """The rank that orthogonalises each matrix: largest cost first, to the least loaded rank."""
    cost = [p.numel() * min(p.shape[-2:]) for p in params]  # Newton-Schulz FLOPs ~ E·R·C·min(R, C)
    load, owners = [0] * world_size, [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i], load[rank] = rank, load[rank] + cost[i]
    return owners


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups marked ``muon=True`` (matrices or stacks of them), AdamW for the rest.

    Group keys, Muon: ``lr`` (0.02), ``momentum`` (0.95), ``nesterov`` (True), ``weight_decay`` (0);
    AdamW: ``lr``, ``betas``, ``eps``, ``weight_decay`` (give AdamW groups their own ``lr``: the
    default is Muon's). ``ns_dtype`` None picks :func:`default_ns_dtype` for the parameters' device.
    ``adamw_fused`` runs AdamW groups through torch's fused kernel (where it exists), else foreach.
    Under torch.distributed (``process_group``, default: the world when initialised) the
    orthogonalisation is shared out between ranks (see the module docstring).
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5, ns_dtype: Optional[torch.dtype] = None, adamw_fused: bool = False,
                 process_group: Optional[dist.ProcessGroup] = None):
        if lr <= 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: need lr > 0, momentum in [0, 1), ns_steps >= 1 (got {lr}, {momentum}, {ns_steps})")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas,
                        eps=eps, muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["muon"]:
                group["fused"] = adamw_fused  # also tells load_state_dict where AdamW's step counters live
        self.matrices = [p for g in self.param_groups if g["muon"] for p in g["params"]]
        flat = [p for p in self.matrices if p.ndim < 2]
        if flat:
            raise ValueError(f"Muon: muon=True groups take matrices only (got a tensor of shape {tuple(flat[0].shape)})")
        device = self.matrices[0].device if self.matrices else torch.device("cpu")
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype or default_ns_dtype(device)
        distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group if distributed else None
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.owners = assign_owners(self.matrices, self.world_size)
        # Where each matrix's update sits in its owner's exchange buffer, and the largest buffer.
        self.offsets, used = [], [0] * self.world_size
        for p, owner in zip(self.matrices, self.owners):
            self.offsets.append(used[owner])
            used[owner] += p.numel()
        self.share_numel = max(used)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = self._orthogonalized_updates()
        index = {id(p): i for i, p in enumerate(self.matrices)}
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_step(group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if index[id(p)] in updates]
            if params and wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            by_scale: dict[float, list] = defaultdict(list)  # one multi-tensor add per shape factor
            for p in params:
                by_scale[shape_scale(p)].append(p)
            for scale, same in by_scale.items():
                torch._foreach_add_(same, [updates[index[id(p)]] for p in same], alpha=-lr * scale)
        return loss

    def _momentum_updates(self) -> dict[int, torch.Tensor]:
        """Advance every momentum buffer; the (Nesterov) update of each matrix that has a gradient."""
        index = {id(p): i for i, p in enumerate(self.matrices)}
        out: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None] if group["muon"] else []
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - mu)  # M <- mu*M + (1-mu)*G
            updates = torch._foreach_lerp(grads, buffers, mu) if group["nesterov"] else buffers
            out.update({index[id(p)]: u for p, u in zip(params, updates)})
        return out

    def _orthogonalized_updates(self) -> dict[int, torch.Tensor]:
        """newton_schulz of every matrix's momentum update, keyed by its index in ``self.matrices``."""
        pending = self._momentum_updates()
        if self.world_size == 1:
            return _orthogonalize_stacked(pending, self.ns_steps, self.ns_dtype)
        mine = {i: u for i, u in pending.items() if self.owners[i] == self.rank}
        done = _orthogonalize_stacked(mine, self.ns_steps, self.ns_dtype)
        share = torch.zeros(self.share_numel, dtype=self.matrices[0].dtype, device=self.matrices[0].device)
        for i, o in done.items():  # a matrix without a gradient leaves zeros (no rank applies it)
            share[self.offsets[i]:self.offsets[i] + o.numel()] = o.flatten()
        shares = [torch.empty_like(share) for _ in range(self.world_size)]
        dist.all_gather(shares, share, group=self.process_group)
        return {i: shares[self.owners[i]][self.offsets[i]:self.offsets[i] + u.numel()].view_as(u)
                for i, u in pending.items()}

    def _adamw_step(self, group: dict) -> None:
        """AdamW (Loshchilov & Hutter 2019) on one group, through torch's functional kernel."""
        from torch.optim.adamw import adamw

        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                step_device = p.device if group["fused"] else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], foreach=not group["fused"], fused=group["fused"] or None,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)


def _orthogonalize_stacked(updates: dict[int, torch.Tensor], steps: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """newton_schulz of each update (in ``dtype``, returned in the update's), every matrix of one
    (oriented) shape in one batched call."""
    by_shape: dict[tuple, list] = defaultdict(list)
    for i, u in updates.items():
        m = u.reshape(-1, *u.shape[-2:])  # (E, R, C); E = 1 for a plain matrix
        tall = m.shape[-2] > m.shape[-1]
        m = m.mT if tall else m
        by_shape[tuple(m.shape[-2:])].append((i, m, tall))
    out = {}
    for entries in by_shape.values():
        stack = torch.cat([m for _, m, _ in entries])  # (N, R, C)
        ortho = newton_schulz(stack, steps, dtype).to(stack.dtype).split([m.shape[0] for _, m, _ in entries])
        for (i, _, tall), o in zip(entries, ortho):
            out[i] = (o.mT if tall else o).reshape(updates[i].shape)
    return out
