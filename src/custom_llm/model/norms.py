"""RMSNorm (Zhang & Sennrich 2019): scale by the reciprocal root-mean-square, no mean subtraction, no bias.

Legend: B batch, T time, C channels (d_model).
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, C); the statistics in fp32 so bf16/fp16 inputs do not lose precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight, as Hugging Face Llama does, so logits match it exactly.
        return self.weight * x32.to(x.dtype)
