"""Rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half layout.

Each head vector of width D is split into a first half and a second half; the pair (x[i], x[i + D/2])
is rotated by the angle position * theta^(-2i/D). This is the layout of Hugging Face Llama, so weights
map one to one without permuting q/k projection rows.

Legend: B batch, T time, H heads, D head dim.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given absolute positions (any length: no precomputed limit)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (T, D) or (B, T, D), in fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): same angle for both halves
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D) or (B, T, D)."""
    if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
