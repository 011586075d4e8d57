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


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight dtypes ``load_for_inference`` takes by name, besides ``auto``."""


def load_for_inference(path: str | Path, device: Optional[str] = None, dtype: str = "auto",
                       quantize: Optional[str] = None, group_size: int = 32):
    """(model, tokenizer, start token id or None) for generating, serving or evaluating from ``path``.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available); ``dtype``: ``auto`` (bf16 on
    CUDA, the checkpoint's elsewhere) or a name of :data:`DTYPE_NAMES`; ``quantize``: ``int8`` / ``int4``
    weight-only quantization on load (``group_size`` for int4), refused for a checkpoint that is already
    quantized. The start token is what a prompt begins with: BOS for Hugging Face models, our EOS
    (the document separator) for ours. Every problem is a UserError with one line.
    """
    from .devices import resolve_device

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    torch_device = resolve_device(device)
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPE_NAMES)} (got {dtype!r})")
    torch_dtype = DTYPE_NAMES.get(dtype, torch.bfloat16 if torch_device.type == "cuda" else None)
    model = load_model(path, device=torch_device, dtype=torch_dtype)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}: they do not belong together (was tokenizer.json replaced?)")
    if quantize:
        from .generation.quant import quantize_model

        if getattr(model, "quantization", None):
            raise UserError(f"{path} is already quantized ({model.quantization['mode']}); drop --quantize")
        quantize_model(model, quantize, group_size)  # checks the mode and group size first
    start = tokenizer.bos_id if is_hf_folder(path) else tokenizer.eos_id
    return model, tokenizer, (start if start is not None and start >= 0 else None)
