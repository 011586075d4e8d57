"""Causal self-attention with grouped-query heads, optional sliding window, and three kernels.

* ``eager``: the plain math below, the readable reference every fast path is tested against.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention / memory-efficient
  kernels where the device has them), ``is_causal`` for full attention, a boolean mask for windows;
  in fp32 under CPU autocast (see ``Attention.forward``).
* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask, which skips whole blocks outside
  a sliding window; the fast path for windows on CUDA (compiled there). PyTorch has no flex backward
  on the CPU, so CPU training with ``flex`` runs the ``sdpa`` path (same mask, same numbers).

Grouped-query attention (Ainslie et al. 2023): K key/value heads serve H query heads, query head h
reading kv head h // (H / K). Sliding window (Beltagy et al. 2020; Mistral): query i attends keys j
with i - W < j <= i, that is W keys including itself.

Legend: B batch, T query time, S key time, C d_model, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rotary


def causal_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean mask (..., T, S), True where query position q may attend key position k.

    Allowed: k <= q, and, with a window W, k > q - W. Built by broadcasting, no loop over positions.
    """
    q = q_pos.unsqueeze(-1)  # (..., T, 1)
    k = k_pos.unsqueeze(-2)  # (..., 1, S)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention: softmax(q k^T / sqrt(D) + mask) v, softmax in fp32.

    q (B, H, T, D); k, v (B, K, S, D); mask bool broadcastable to (B, H, T, S). Returns (B, H, T, D).
    """
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D): query head h reads kv head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's fused attention; ``mask`` None means plain causal attention over T == S.

    With a mask, ``enable_gqa=True`` sends SDPA to its math kernel (B x H x T x S fp32 scores, memory
    quadratic in T) on the torch versions users have, so K/V are expanded to the query heads instead
    and a fused kernel (memory-efficient on CUDA, flash on the CPU) takes the masked call. Without a
    mask, ``is_causal`` + ``enable_gqa`` reads the K/V heads in place.

    With a mask and few queries (decoding, speculative verification: T <= ``FOLD_MAX_QUERIES``) the
    query heads that share a kv head are folded into the query time instead (:func:`_fold_query_groups`):
    the same numbers without copying the cache's K/V n_rep times every step.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and q.shape[2] <= FOLD_MAX_QUERIES and (mask.dim() < 4 or mask.shape[1] == 1):
        return _fold_query_groups(q, k, v, mask, dropout_p)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D): query head h reads kv head h // n_rep
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# Masked attention with at most this many queries folds GQA groups into time (decode, speculative
# verification); longer inputs expand K/V instead, as the folded mask grows with n_rep * T * S.
FOLD_MAX_QUERIES = 16


def _fold_query_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       dropout_p: float) -> torch.Tensor:
    """Masked GQA attention as K heads of n_rep * T queries each; (B, H, T, D) out, as SDPA's.

    Query head h = kv * n_rep + r reads kv head ``kv``, so viewing q as (B, K, n_rep * T, D) puts every
    query of a kv head's group in that head's rows, and SDPA reads each K/V head once, in place. The
    mask (B|1, 1, T, S), shared by all heads, is repeated for the n_rep query rows of each group.
    Measured in the compiled CPU decode step (bench model: H=6, K=2, 256 cache slots, one thread):
    0.17 ms a layer for the expand-and-copy plus the 6-head kernel, 0.05 ms folded.
    """
    B, H, T, D = q.shape
    K, n_rep = k.shape[1], H // k.shape[1]
    folded = q.reshape(B, K, n_rep * T, D)  # rows: (r, t) for each kv head
    if mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (1, 1, T, S)
    mask = mask.repeat(1, 1, n_rep, 1)  # (B|1, 1, n_rep * T, S): row (r, t) is query t's row
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, H, T, D)


def build_block_mask(window: Optional[int], length: int, device: torch.device,
                     document_ids: Optional[torch.Tensor] = None) -> Any:
    """A flex-attention block mask for causal (or sliding-window) attention over ``length`` tokens,
    kept inside each document when ``document_ids`` (B, T) is given (packed sequences).

    Built by the model once per forward, outside compiled code (as gpt-fast and torchtitan do), and
    passed to the layers: built inside a compiled block, it would be traced into every block's graph.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed = allowed & (kv_idx > q_idx - window)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return allowed

    batch = None if document_ids is None else document_ids.shape[0]
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=device)


def document_mask(document_ids: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean (B, 1, T, T): causal (windowed) attention that stays inside each document of a packed row."""
    pos = torch.arange(document_ids.shape[1], device=document_ids.device)
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
    return (causal_window_mask(pos, pos, window) & same).unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with RoPE, GQA, an optional sliding window and a choice of kernel."""

    def __init__(self, config: ModelConfig, layer_idx: int, window: Optional[int]):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        self.eager = config.attn_backend == "eager"  # else SDPA, or flex when the model passes a block mask
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=config.attn_bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.attn_bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Any = None,
                mask: Any = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        ``kv_cache``, when given (generation), must offer ``update(layer_idx, k, v) -> (k_all, v_all,
        mask)``: it stores this step's keys/values and returns every key/value the queries may see with
        a boolean mask broadcastable to (B, H, T, S), or None when those are exactly this step's T keys
        and plain causal attention applies. ``mask``, built by the model once per forward for this
        layer's window: a flex block mask (:func:`build_block_mask`) runs flex attention, passed when
        ``attn_backend`` is ``flex`` and flex can run (not in CPU training, where torch has no flex
        backward: SDPA with the same mask instead); a boolean (B, 1, T, T) tensor
        (:func:`document_mask`, packed documents) runs SDPA or the eager reference with it.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0

        if mask is not None and not isinstance(mask, torch.Tensor):  # a flex block mask
            y = _flex_attention(q.device.type)(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            if kv_cache is not None:
                k, v, mask = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D), mask (B|1, 1, T, S) or None
            elif mask is None and self.window is not None:
                pos = torch.arange(T, device=x.device)
                mask = causal_window_mask(pos, pos, self.window)  # (T, T)
            # mask None: plain causal attention over these T keys
            if self.eager:
                if mask is None:
                    pos = torch.arange(T, device=x.device)
                    mask = causal_window_mask(pos, pos, None)
                y = eager_attention(q, k, v, mask, dropout_p)
            elif q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # CPU bf16 training: attention in fp32, the projections around it in bf16. torch's CPU
                # flash kernel runs its bf16 backward ~8x slower than its fp32 one at these sizes
                # (tiny preset, B=16, T=128: 31 against 4 ms a layer), which undid the bf16 matmuls' gain.
                with torch.autocast("cpu", enabled=False):
                    y = sdpa_attention(q.float(), k.float(), v.float(), mask, dropout_p)
            else:
                y = sdpa_attention(q, k, v, mask, dropout_p)

        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


_FLEX_FUNCTIONS: dict[str, Any] = {}


def _flex_attention(device_type: str):
    """flex_attention, compiled on CUDA (where that is what makes it fast), plain elsewhere."""
    if device_type not in _FLEX_FUNCTIONS:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_FUNCTIONS[device_type] = torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention
    return _FLEX_FUNCTIONS[device_type]
