"""Sparse mixture of experts: a router picks k of E SwiGLU experts for every token.

Ideas, with their sources:

- top-k routing over a softmax of all expert logits, optional renormalisation of the k chosen
  weights (Mixtral renormalises, Qwen2-MoE does not);
- noisy top-k gating (Shazeer et al. 2017): in training only, router logits get standard-normal noise
  scaled by softplus of a second learned projection, so unused experts still get explored;
- shared experts (DeepSeek-MoE, Dai et al. 2024): an always-on SwiGLU added to the routed output,
  optionally scaled by a per-token sigmoid gate (Qwen2-MoE's ``shared_expert_gate``);
- load-balancing loss (Switch Transformer, Fedus et al. 2021) and router z-loss (ST-MoE, Zoph et al. 2022);
- dropless dispatch: every token reaches its k experts; no capacity factor.

Parameters and their Hugging Face (transformers 5.x, Mixtral / Qwen2-MoE ``model.layers.{i}.mlp.``) names:

=================================  ==========  =====================================================
ours (``layers.{i}.mlp.``)         shape       Hugging Face
=================================  ==========  =====================================================
``router.weight``                  (E, C)      ``gate.weight``
``noise.weight``                   (E, C)      none (training only; dropped on export)
``experts.gate_up_proj``           (E, 2F, C)  ``experts.gate_up_proj`` (rows [:F] gate, [F:] up);
                                               hub files: ``experts.{e}.w1`` = [:F], ``w3`` = [F:]
``experts.down_proj``              (E, C, F)   ``experts.down_proj``; hub files ``experts.{e}.w2``
``shared_expert.{gate,up,down}_proj.weight``   ``shared_expert.{gate,up,down}_proj.weight`` (Qwen2-MoE)
``shared_expert_gate.weight``      (1, C)      ``shared_expert_gate.weight`` (Qwen2-MoE)
=================================  ==========  =====================================================

Dispatch paths (all give the same result; ``eager`` is the readable reference the tests hold the
others to): ``eager`` loops over experts and finds each one's tokens with a mask; ``sorted`` sorts the
token-slots by expert once and runs every expert on its contiguous slice (one host sync for the
slice sizes); ``grouped_mm`` runs all experts in one grouped matrix multiply (no host sync; on CUDA
in bf16 under autocast); ``gathered`` gathers each token's K experts' weights and applies them with
batched products (static shapes, no sync; reads only the chosen experts, so it suits a few tokens:
decoding, as in gpt-fast). ``auto`` (:func:`resolve_dispatch`, decided once per device, dtype and
compile state) is ``gathered`` for compiled decoding (``MoE._decoding``), else ``grouped_mm`` where
this torch has a kernel for the device (``F.grouped_mm``, torch >= 2.10: CPU and CUDA;
``torch._grouped_mm``: CUDA; compiled code: bf16 only; widths multiples of 8), else ``sorted``.

Legend: B batch, T time, C d_model, N tokens (B*T), E experts, K experts per token (top-k),
S token-slots (N*K), F expert hidden width.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mlp import SwiGLU


GATHER_MAX_TOKENS_COMPILED = 64


class RouterStats(NamedTuple):
    """What one MoE layer's forward reports beside its output; it travels with that output.

    ``aux_loss`` (load balancing) and ``z_loss`` (router z-loss) are 0-dim tensors before their
    coefficients; ``expert_load`` (E,) is the detached fraction of token-slots each expert received.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor


def _grouped_mm_function() -> Optional[Callable]:
    """torch.nn.functional.grouped_mm (torch >= 2.10), else torch._grouped_mm (>= 2.8), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the grouped GEMMs run in: CUDA autocast's (grouped_mm is not autocast-aware), else x's."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def grouped_mm_aligned(dim: int, hidden_dim: int) -> bool:
    """grouped_mm needs 16-byte aligned strides: in bf16, widths that are multiples of 8."""
    return dim % 8 == 0 and hidden_dim % 8 == 0


@functools.lru_cache(maxsize=None)
def resolve_dispatch(requested: str, device_type: str, dtype: torch.dtype, compiling: bool, decoding: bool,
                     aligned: bool) -> str:
    """The dispatch path for one (setting, device, dtype, compile state) combination, decided once.

    ``decoding``: a few tokens without gradients (see :meth:`MoE._decoding`). ``auto`` takes
    ``gathered`` for compiled decoding (static shapes, no recompilation per routing; never in
    training, where gathering every token's expert weights costs memory per token), else
    ``grouped_mm`` where this torch has a kernel for the device, dtype and alignment (compiled code:
    bf16 only, torch 2.13's shape function rejects fp32), else ``sorted``.
    """
    if requested != "auto":
        return requested
    if compiling and decoding:
        return "gathered"
    bf16 = dtype == torch.bfloat16
    if not aligned or (compiling and not bf16):
        return "sorted"
    if hasattr(F, "grouped_mm"):
        return "grouped_mm"
    if device_type == "cuda" and hasattr(torch, "_grouped_mm") and bf16 \
            and torch.cuda.get_device_capability()[0] >= 9:
        return "grouped_mm"
    return "sorted"


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E * sum_i f_i * P_i from probs (N, E) and slots per expert (E,).

    f_i = (token-slots routed to expert i) / N and P_i = mean router probability of expert i.
    Each token's K choices all count, so sum_i f_i = K and a perfectly balanced router scores K:
    this is Hugging Face Mixtral's ``load_balancing_loss_func`` convention (for K = 1, Switch's).
    """
    n_tokens, n_experts = probs.shape
    f = counts.to(probs.dtype) / n_tokens  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Experts(nn.Module):
    """E SwiGLU experts held as stacked weights, applied to the token-slots a router chose."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.hidden_dim = hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))  # (E, 2F, C)
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # (E, C, F)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (.., F) each
        return F.silu(gate) * up

    def forward_eager(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """Reference: for each expert, find its tokens with a mask and add its weighted output."""
        out = torch.zeros_like(x)  # (N, C)
        for e in range(self.n_experts):
            token, slot = torch.where(idx == e)  # (n_e,) each
            h = self._swiglu(F.linear(x[token], self.gate_up_proj[e]))  # (n_e, F)
            y = F.linear(h, self.down_proj[e]) * weights[token, slot, None]  # (n_e, C)
            out.index_add_(0, token, y)
        return out

    @torch.compiler.disable  # data-dependent slice sizes: compiled, every routing would be a new graph
    def forward_sorted(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """Sort token-slots by expert; run each expert on its contiguous slice; add back weighted.

        Runs eagerly even inside compiled code (one graph break, no recompilation per routing)."""
        k = idx.shape[1]
        order = idx.reshape(-1).argsort(stable=True)  # (S,) slots grouped by expert
        token = order // k  # (S,) token of each sorted slot
        xs = x[token]  # (S, C)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # one grad stack each
        ys = []
        for e, x_e in enumerate(xs.split(counts.tolist())):  # the one host sync
            if x_e.shape[0] > 0:
                ys.append(F.linear(self._swiglu(F.linear(x_e, gate_up[e])), down[e]))  # (n_e, C)
        y = torch.cat(ys) * weights.reshape(-1)[order, None]  # (S, C)
        return torch.zeros_like(x).index_add_(0, token, y)

    def forward_grouped_mm(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
        """All experts in one grouped GEMM per projection; offsets stay on the device (no sync)."""
        grouped_mm = _grouped_mm_function()
        n, k = idx.shape
        order = idx.reshape(-1).argsort(stable=True)  # (S,)
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        dtype = _grouped_mm_dtype(x)
        gate_up = self.gate_up_proj.to(dtype).transpose(1, 2)  # (E, C, 2F)
        down = self.down_proj.to(dtype).transpose(1, 2)  # (E, F, C)
        xs = x.to(dtype)[order // k]  # (S, C)
        h = self._swiglu(grouped_mm(xs, gate_up, offs=offsets))  # (S, F)
        y = grouped_mm(h, down, offs=offsets)  # (S, C)
        y = y.float() * weights.reshape(-1)[order, None].float()
        unsorted = torch.empty_like(y).index_copy_(0, order, y)  # (S, C) back in token-slot order
        return unsorted.view(n, k, -1).sum(dim=1).to(x.dtype)  # (N, C), deterministic reduction

    def forward_gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
        """Each token's K experts' weights gathered, (N, K, ...), and applied as batched products."""
        gate_up = self.gate_up_proj[idx]  # (N, K, 2F, C)
        down = self.down_proj[idx]  # (N, K, C, F)
        h = self._swiglu(torch.einsum("nc,nkfc->nkf", x, gate_up))  # (N, K, F)
        y = torch.einsum("nkf,nkcf->nkc", h, down)  # (N, K, C)
        return (y * weights.unsqueeze(-1)).sum(dim=1)  # (N, C)


class MoE(nn.Module):
    """Mixture-of-experts feed-forward: (B, T, C) -> ((B, T, C), :class:`RouterStats`).

    The router's losses and load are returned with the output (never kept on the module), so a
    block that LayerDrop skips contributes nothing, and nothing outlives the step that made it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, n_experts = config.d_model, config.n_experts
        self.top_k = config.moe_top_k
        self.renormalize = config.moe_renormalize
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.noise = nn.Linear(dim, n_experts, bias=False) if config.moe_noisy_gating else None
        self.experts = Experts(n_experts, dim, config.resolved_moe_ffn_dim)
        self.shared_expert = SwiGLU(dim, config.resolved_shared_ffn_dim) if config.n_shared_experts else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if config.shared_expert_gate else None
        self.dispatch = config.moe_dispatch
        if self.dispatch == "grouped_mm" and _grouped_mm_function() is None:
            from ..config import ConfigError

            raise ConfigError("moe_dispatch 'grouped_mm' needs torch >= 2.8 (torch._grouped_mm); use 'sorted'")
        self.aligned = grouped_mm_aligned(dim, config.resolved_moe_ffn_dim)
        self.init_weights(config.init_std, config.init_std / (2 * config.n_layers) ** 0.5)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Inputs (router, gate/up projections, shared gate) normal(0, std); down projections
        normal(0, out_std); the noise projection 0, so initial noise has scale softplus(0) (Shazeer et al.)."""
        for weight in (self.router.weight, self.experts.gate_up_proj):
            nn.init.normal_(weight, mean=0.0, std=std)
        nn.init.normal_(self.experts.down_proj, mean=0.0, std=out_std)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        if self.shared_expert is not None:
            nn.init.normal_(self.shared_expert.gate_proj.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared_expert.up_proj.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared_expert.down_proj.weight, mean=0.0, std=out_std)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, mean=0.0, std=std)

    def routed_expert_params(self) -> int:
        """Parameters of all routed experts (a token uses K/E of them)."""
        return self.experts.gate_up_proj.numel() + self.experts.down_proj.numel()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> (router logits (N, E) fp32, probs (N, E), top-k weights (N, K), expert ids (N, K))."""
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32 (Switch: selective precision)
            x32 = x.float()
            logits = F.linear(x32, self.router.weight.float())  # (N, E)
            noisy = logits
            if self.noise is not None and self.training:
                noisy = logits + torch.randn_like(logits) * F.softplus(F.linear(x32, self.noise.weight.float()))
        probs = noisy.softmax(dim=-1)  # (N, E)
        weights, idx = probs.topk(self.top_k, dim=-1)  # (N, K)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, idx

    def _dispatch_path(self, x: torch.Tensor) -> Callable:
        compiling = torch.compiler.is_compiling()
        # Compiled code decides once at trace time; the cache is for eager calls (dynamo ignores lru_cache).
        resolve = resolve_dispatch.__wrapped__ if compiling else resolve_dispatch
        path = resolve(self.dispatch, x.device.type, _grouped_mm_dtype(x), compiling, self._decoding(x.shape[0]),
                       self.aligned)
        return getattr(self.experts, f"forward_{path}")

    @staticmethod
    def _decoding(n_tokens: int) -> bool:
        """A few tokens without gradients (a batch of decoding prompts): where compiled ``auto`` takes
        ``gathered``, up to GATHER_MAX_TOKENS_COMPILED tokens, since the other paths' data-dependent
        shapes would cost a recompilation per routing. Eagerly the sorted path is faster even for one
        token (measured: 12.1 against 15.5 ms per decoded token, 2-core CPU, d=384, 8 experts top-2):
        copying the gathered weights costs more than the one host sync it saves."""
        return n_tokens <= GATHER_MAX_TOKENS_COMPILED and not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """(B, T, C) -> (weighted sum of each token's K experts plus the shared experts (B, T, C), stats)."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        logits, probs, weights, idx = self.route(x)
        counts = torch.zeros_like(logits[0], dtype=torch.long).scatter_add_(
            0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))  # (E,) slots per expert, no sync
        out = self._dispatch_path(x)(x, idx, weights.to(x.dtype), counts)  # (N, C)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # (N, C)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        stats = RouterStats(aux_loss=load_balancing_loss(probs, counts), z_loss=router_z_loss(logits),
                            expert_load=(counts.float() / idx.numel()).detach())
        return out.view(B, T, C), stats
