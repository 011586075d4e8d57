"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

With ReZero (Bachlechner et al. 2020) each residual branch is multiplied by a learnable scalar that
starts at 0, so a freshly initialised block is the identity and signal propagation starts clean. We
keep the pre-norms (ReZero's paper drops them) so the option changes one thing only.

Legend: B batch, T time, C d_model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .mlp import SwiGLU
from .moe import MoE, RouterStats
from .norms import RMSNorm


class Block(nn.Module):
    """Attention and feed-forward sub-layers, each pre-normed, each with a residual connection."""

    def __init__(self, config: ModelConfig, layer_idx: int, window: Optional[int], moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx, window)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = moe
        if moe:
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = SwiGLU(config.d_model, config.resolved_ffn_dim)
        self.dropout = config.dropout
        if config.rezero:
            self.attn_scale: Optional[nn.Parameter] = nn.Parameter(torch.zeros(()))
            self.mlp_scale: Optional[nn.Parameter] = nn.Parameter(torch.zeros(()))
        else:
            self.attn_scale = self.mlp_scale = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Any = None,
                mask: Any = None) -> tuple[torch.Tensor, Optional[RouterStats]]:
        """(B, T, C) -> ((B, T, C), the MoE layer's router statistics, or None for a dense block).

        ``mask``: the attention mask the model built for this layer (see Attention.forward)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        x = x + self._residual(h, self.attn_scale)
        out = self.mlp(self.post_attention_layernorm(x))
        h, stats = out if self.is_moe else (out, None)
        return x + self._residual(h, self.mlp_scale), stats

    def _residual(self, h: torch.Tensor, scale: Optional[nn.Parameter]) -> torch.Tensor:
        if self.dropout > 0 and self.training:
            h = F.dropout(h, p=self.dropout)
        return h if scale is None else scale * h
