"""custom-llm: a readable, modular, modern decoder-only LLM in PyTorch."""

from .api import load_model, load_tokenizer
from .config import MODEL_PRESETS, ModelConfig, model_preset
from .errors import ConfigError, UserError
from .model import (Attention, Block, Experts, LossOutput, MoE, RMSNorm, RotaryEmbedding, SwiGLU, Transformer,
                    apply_rotary, causal_window_mask, eager_attention)

__version__ = "0.1.0"

__all__ = ["Attention", "Block", "ConfigError", "Experts", "LossOutput", "MoE", "MODEL_PRESETS", "ModelConfig", "RMSNorm",
           "RotaryEmbedding", "SwiGLU", "Transformer", "UserError", "apply_rotary", "causal_window_mask",
           "eager_attention", "load_model", "load_tokenizer", "model_preset"]
