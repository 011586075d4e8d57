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

from ..devices import bf16_matmul_is_native

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
    X = (G.mT if tall else G).to(dtype)  # (..., R, C), R <= C
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)).reshape(-1, *X.shape[-2:])  # (N, R, C)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)  # (N, R, R)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.baddbmm(X, B, X, beta=a)  # a·X + B·X
    X = X.reshape(*G.shape[:-2], *X.shape[-2:])
    return X.mT if tall else X


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies bf16 matrices natively (CUDA with bf16; CPUs with AVX512-BF16 or
    AMX), else fp32."""
    return torch.bfloat16 if bf16_matmul_is_native(device) else torch.float32


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


class StackPlan:
    """Where one rank's matrices sit in its Newton-Schulz stacks: one (N, R, C) stack per oriented shape.

    Decided once, at construction: ``slots[i] = (stack, first, count, tall)`` for each matrix i the
    rank owns (``count`` = E for an expert stack, 1 for a plain matrix; ``tall`` when R > C and the
    matrix sits transposed); ``shapes`` the stacks' shapes; ``offsets`` each stack's start in the
    rank's flat exchange buffer of ``numel`` elements.
    """

    def __init__(self, matrices: list[torch.Tensor], owned: list[int]):
        keys: dict[tuple[int, int], int] = {}
        counts: list[int] = []
        self.slots: dict[int, tuple[int, int, int, bool]] = {}
        for i in owned:
            R, C = matrices[i].shape[-2:]
            count = matrices[i].numel() // (R * C)
            key = (min(R, C), max(R, C))
            stack = keys.setdefault(key, len(keys))
            counts.extend([0] * (len(keys) - len(counts)))
            self.slots[i] = (stack, counts[stack], count, R > C)
            counts[stack] += count
        self.shapes = [(counts[stack], *key) for key, stack in keys.items()]
        self.offsets, self.numel = [], 0
        for n, r, c in self.shapes:
            self.offsets.append(self.numel)
            self.numel += n * r * c

    def views(self, stacks: list[torch.Tensor], i: int, shape: torch.Size) -> torch.Tensor:
        """Matrix i's entry of ``stacks`` as a view of its own ``shape`` (transposed back when tall)."""
        stack, first, count, tall = self.slots[i]
        view = stacks[stack][first:first + count]  # (E, r, c)
        view = view.mT if tall else view  # (E, R, C)
        return view if len(shape) == 3 else view[0]


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups marked ``muon=True`` (matrices or stacks of them), AdamW for the rest.

    Group keys, Muon: ``lr`` (0.02), ``momentum`` (0.95), ``nesterov`` (True), ``weight_decay`` (0);
    AdamW: ``lr``, ``betas``, ``eps``, ``weight_decay`` (give AdamW groups their own ``lr``: the
    default is Muon's). ``ns_dtype`` None picks :func:`default_ns_dtype` for the parameters' device.
    ``adamw_fused`` runs AdamW groups through torch's fused kernel (where it exists), else foreach.
    Under torch.distributed (``process_group``, default: the world when initialised) the
    orthogonalisation is shared out between ranks (see the module docstring).

    Per step the momentum updates are written straight into one stack per matrix shape
    (:class:`StackPlan`, buffers allocated once), each stack takes one batched :func:`newton_schulz`
    in ``ns_dtype``, and the results are applied as views of the stacks: about forty tensor
    operations for any number of matrices. State (saved in optimizer.safetensors): ``momentum_buffer``
    per matrix; ``step``, ``exp_avg``, ``exp_avg_sq`` per AdamW parameter.
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
        odd = [p for p in self.matrices if p.ndim not in (2, 3)]
        if odd:
            raise ValueError(f"Muon: muon=True groups take matrices or (E, R, C) stacks of them only "
                             f"(got a tensor of shape {tuple(odd[0].shape)})")
        self.index = {id(p): i for i, p in enumerate(self.matrices)}
        self.device = self.matrices[0].device if self.matrices else torch.device("cpu")
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype or default_ns_dtype(self.device)
        distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group if distributed else None
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.owners = assign_owners(self.matrices, self.world_size)
        self.plans = [StackPlan(self.matrices, [i for i, o in enumerate(self.owners) if o == r])
                      for r in range(self.world_size)]
        self._stacks: Optional[_Stacks] = None  # allocated at the first step

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = self._orthogonalized_updates()
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_step(group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if params and wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            by_scale: dict[float, list] = defaultdict(list)  # one multi-tensor add per shape factor
            for p in params:
                by_scale[shape_scale(p)].append(p)
            for scale, same in by_scale.items():
                torch._foreach_add_(same, [updates[id(p)] for p in same], alpha=-lr * scale)
        return loss

    def _orthogonalized_updates(self) -> dict[int, torch.Tensor]:
        """Advance every momentum buffer; newton_schulz of each matrix's (Nesterov) momentum update,
        as a view (in the parameters' dtype) keyed by ``id(param)``."""
        if self._stacks is None:
            self._stacks = _Stacks(self.plans, self.rank, self.matrices)
        stacks, plan = self._stacks, self.plans[self.rank]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None] if group["muon"] else []
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(buffers, [p.grad for p in params], 1 - mu)  # M <- mu*M + (1-mu)*G
            for p, buf in zip(params, buffers):  # this rank's matrices, written into their stacks
                out = stacks.inputs_of.get(self.index[id(p)])
                if out is None:
                    continue
                if group["nesterov"]:
                    torch.lerp(p.grad, buf, mu, out=out)  # (1-mu)*G + mu*M
                else:
                    out.copy_(buf)
        for i, out in stacks.inputs_of.items():  # a matrix without a gradient: zeros, never applied
            if self.matrices[i].grad is None:
                out.zero_()
        for stack, result in zip(stacks.inputs, stacks.results):
            result.copy_(newton_schulz(stack, self.ns_steps, self.ns_dtype))
        if self.world_size > 1:  # one all_gather of every rank's flat results
            dist.all_gather(stacks.shares, stacks.send, group=self.process_group)
        return {id(p): stacks.updates_of[i] for i, p in enumerate(self.matrices) if p.grad is not None}

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


class _Stacks:
    """The buffers of :meth:`Muon.step`, allocated once, with a view per matrix into them.

    ``inputs`` (this rank's stacks of momentum updates, one per shape) and ``inputs_of[i]``;
    ``results`` (their newton_schulz, in the parameters' dtype); ``updates_of[i]`` every matrix's
    result. Under several ranks the results are views of the flat ``send`` buffer, which one
    all_gather copies into ``shares[rank]`` on every rank, and ``updates_of`` points into ``shares``.
    """

    def __init__(self, plans: list[StackPlan], rank: int, matrices: list[torch.Tensor]):
        like = matrices[0] if matrices else torch.zeros(())
        plan = plans[rank]
        self.inputs = [like.new_zeros(shape) for shape in plan.shapes]
        self.inputs_of = {i: plan.views(self.inputs, i, matrices[i].shape) for i in plan.slots}
        if len(plans) == 1:
            self.results = [like.new_zeros(shape) for shape in plan.shapes]
            self.updates_of = {i: plan.views(self.results, i, m.shape) for i, m in enumerate(matrices)}
            return
        size = max(p.numel for p in plans)  # every rank's flat buffer has the size of the largest share
        self.send = like.new_zeros(size)
        self.shares = [like.new_zeros(size) for _ in plans]
        self.results = _stack_views(self.send, plan)
        gathered = [_stack_views(share, p) for share, p in zip(self.shares, plans)]
        owner = {i: r for r, p in enumerate(plans) for i in p.slots}
        self.updates_of = {i: plans[owner[i]].views(gathered[owner[i]], i, m.shape) for i, m in enumerate(matrices)}


def _stack_views(flat: torch.Tensor, plan: StackPlan) -> list[torch.Tensor]:
    """A plan's stacks as (N, R, C) views of one flat buffer."""
    return [flat[offset:offset + n * r * c].view(n, r, c) for offset, (n, r, c) in zip(plan.offsets, plan.shapes)]
