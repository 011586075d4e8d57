"""The public loading functions: a project checkpoint (or run directory) or a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .checkpoint_io import CONFIG_FILE, load_checkpoint_model, read_json, resolve_checkpoint_dir
from .errors import UserError


def is_hf_folder(path: Path) -> bool:
    """True when ``path`` holds a Hugging Face ``config.json`` (it names a ``model_type``)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    data = read_json(config)
    return isinstance(data, dict) and "model_type" in data


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Load a model from a checkpoint directory, a run directory (newest checkpoint) or an HF folder."""
    path = Path(path)
    if is_hf_folder(path):
        from .interop.hf import load_hf_model

        return load_hf_model(path, device=device, dtype=dtype)
    directory = resolve_checkpoint_dir(path)
    from .generation.quant_io import load_quantized, quantization_of  # int8/int4 checkpoints (custom-llm quantize)

    if quantization_of(directory):
        return load_quantized(directory, device=device, dtype=dtype)
    from .interop.peft import is_lora_checkpoint, load_lora_checkpoint  # a LoRA fine-tune: adapters folded in

    if is_lora_checkpoint(directory):
        return load_lora_checkpoint(directory, device=device, dtype=dtype)
    return load_checkpoint_model(directory, device=device, dtype=dtype)


def load_tokenizer(path: str | Path):
    """Load the tokenizer stored with a checkpoint, a run directory, an HF folder, or a tokenizer file."""
    from .tokenizers import load_tokenizer as _load

    path = Path(path)
    if path.is_file():
        return _load(path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    if not is_hf_folder(path) and not (path / "tokenizer.json").is_file():
        path = resolve_checkpoint_dir(path)
    return _load(path)
