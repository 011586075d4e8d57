"""Model components; each file stands alone on torch and the config."""

from .attention import Attention, causal_window_mask, eager_attention
from .block import Block
from .mlp import SwiGLU
from .norms import RMSNorm
from .rope import RotaryEmbedding, apply_rotary, rotate_half
from .transformer import LossOutput, Transformer

__all__ = ["Attention", "Block", "LossOutput", "RMSNorm", "RotaryEmbedding", "SwiGLU", "Transformer",
           "apply_rotary", "causal_window_mask", "eager_attention", "rotate_half"]
