"""Hugging Face reference models with the very weights and configuration of one of ours.

The twin is built the way a user would get it: our model is exported with :func:`custom_llm.interop.export_hf`
into a temporary folder and loaded back with ``AutoModelForCausalLM.from_pretrained`` in a standard
configuration (``attn_implementation="sdpa"``, fp32 weights, transformers' default experts backend).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch


def transformers_version() -> Optional[str]:
    """The installed transformers version, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def hf_twin(model: torch.nn.Module, attn_implementation: str = "sdpa") -> Optional[torch.nn.Module]:
    """An HF ``*ForCausalLM`` equal to ``model`` (same config and weights, same device), or None without transformers."""
    if transformers_version() is None:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..interop import export_hf

    device = model.embed_tokens.weight.device
    interop_log = logging.getLogger("custom_llm.interop.hf")
    level = interop_log.level
    interop_log.setLevel(logging.ERROR)  # "no tokenizer" is expected here
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="custom-llm-bench-") as tmp:
            folder = export_hf(model, Path(tmp) / "hf", dtype="float32")
            hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation,
                                                      dtype=torch.float32)
    finally:
        interop_log.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()
    hf.generation_config.pad_token_id = 0
    return hf.to(device).train(model.training)


def experts_implementation(hf_model: torch.nn.Module) -> Optional[str]:
    """Which expert backend transformers picked for an MoE model ('grouped_mm', 'eager', ...)."""
    return getattr(hf_model.config, "_experts_implementation", None)
