"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer").

down(silu(gate(x)) * up(x)); parameter names follow Hugging Face Llama.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Gated feed-forward: (B, T, C) -> (B, T, C) through a hidden width F."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
