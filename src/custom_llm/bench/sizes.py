"""Benchmark sizes per device: the CPU defaults, the CUDA reference sizes, and a tiny ``--quick`` set.

The CUDA sizes are the reference sizes of the design document (measured there for Hugging Face on an
H100); the CPU sizes keep every default case within about three minutes on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

CPU_DENSE = dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256)
CUDA_DENSE = dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                  max_seq_len=1024)
QUICK_DENSE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


@dataclass(frozen=True)
class Sizes:
    """Everything a case needs to know about how big to run."""

    dense: dict
    """ModelConfig fields of the dense model (train_dense, decode, prefill, grad_ckpt_memory)."""
    moe: dict
    """ModelConfig fields of the mixture-of-experts model (train_moe)."""
    batch: int
    seq_len: int
    autocast: Optional[torch.dtype]
    """Autocast dtype of training steps (None: the weights' dtype, fp32)."""
    decode_dtype: torch.dtype
    decode_prompt: int
    decode_new_tokens: int
    prefill_len: int
    tokenize_chars: int
    """Characters of the default corpus to tokenize."""
    tokenizer_vocab: int
    warmup: int
    repeats: int
    curriculum: dict = field(default_factory=dict)
    """curriculum case: model fields, batch, seq_len, steps (the budget), eval_tokens, corpus chars."""


def sizes_for(device: torch.device, quick: bool = False, repeats: Optional[int] = None) -> Sizes:
    """The sizes for ``device`` ('cpu' or 'cuda'); ``quick`` gives tiny sizes for smoke tests."""
    if quick:
        sizes = Sizes(dense=QUICK_DENSE, moe={**QUICK_DENSE, "n_experts": 4, "moe_top_k": 2, "moe_ffn_dim": 64},
                      batch=2, seq_len=32, autocast=None, decode_dtype=torch.float32, decode_prompt=4,
                      decode_new_tokens=8, prefill_len=64, tokenize_chars=20_000, tokenizer_vocab=512,
                      warmup=1, repeats=1,
                      curriculum=dict(model=QUICK_DENSE, batch=4, seq_len=32, steps=12, eval_tokens=2048, chars=100_000))
    elif device.type == "cuda":
        sizes = Sizes(dense=CUDA_DENSE,
                      moe={**CUDA_DENSE, "n_layers": 8, "n_experts": 8, "moe_top_k": 2, "moe_ffn_dim": 1024},
                      batch=16, seq_len=1024, autocast=torch.bfloat16, decode_dtype=torch.bfloat16,
                      decode_prompt=16, decode_new_tokens=256, prefill_len=4096, tokenize_chars=8_000_000,
                      tokenizer_vocab=32768, warmup=2, repeats=5,
                      curriculum=dict(model=CUDA_DENSE, batch=16, seq_len=1024, steps=600, eval_tokens=1 << 20,
                                      chars=20_000_000))
    else:
        sizes = Sizes(dense=CPU_DENSE, moe={**CPU_DENSE, "n_experts": 8, "moe_top_k": 2, "moe_ffn_dim": 512},
                      batch=8, seq_len=256, autocast=None, decode_dtype=torch.float32, decode_prompt=16,
                      decode_new_tokens=64, prefill_len=1024, tokenize_chars=2_000_000, tokenizer_vocab=8192,
                      warmup=1, repeats=3,
                      curriculum=dict(model={**CPU_DENSE, "vocab_size": 4096, "d_model": 192, "n_layers": 4},
                                      batch=8, seq_len=128, steps=150, eval_tokens=16384, chars=1_000_000))
    if repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": repeats})
    return sizes
