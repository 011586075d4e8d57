"""Model components; each file stands alone on torch and the config."""

from .attention import Attention, causal_window_mask, eager_attention
from .block import Block
from .loss import fused_lm_loss, reference_lm_loss
from .mlp import SwiGLU
from .moe import MoE, Experts
from .norms import RMSNorm
from .rope import RotaryEmbedding, apply_rotary, rotate_half
from .transformer import LossOutput, Transformer

__all__ = ["Attention", "Block", "Experts", "LossOutput", "MoE", "RMSNorm", "RotaryEmbedding", "SwiGLU", "Transformer",
           "apply_rotary", "causal_window_mask", "eager_attention", "fused_lm_loss", "reference_lm_loss",
           "rotate_half"]
