"""Quantized checkpoints: a checkpoint directory whose ``config.json`` has a ``quantization`` section.

``config.json`` is ``{"format": "custom-llm", "model": {...}, "quantization": {"mode", "group_size",
"head"}}`` and ``model.safetensors`` holds the stored layout of :mod:`.quant` (int8 / packed uint8
weights with their fp32 scales and zeros) beside the float tensors that stay float (embedding, norms,
routers). ``custom_llm.load_model`` reads such a directory through :func:`load_quantized`, which
builds the quantized model on the meta device, loads the tensors, and packs them for the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import write_json
from .quant import pack_for_device, quantized_skeleton

CONFIG_FILE, WEIGHTS_FILE, QUANT_KEY = "config.json", "model.safetensors", "quantization"


def quantization_of(directory: Path) -> Optional[dict]:
    """The ``quantization`` section of a checkpoint directory's config.json, or None (not quantized)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(QUANT_KEY) if isinstance(data, dict) else None


def save_quantized(model: torch.nn.Module, directory: Path) -> Path:
    """Write config.json and model.safetensors of a model quantized by :func:`~.quant.quantize_model`."""
    from safetensors.torch import save_file

    quant = getattr(model, "quantization", None)
    if not quant:
        raise ValueError("the model is not quantized (run quantize_model first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()  # persistent buffers only: the device-independent stored layout
    if model.config.tie_embeddings and not quant["head"]:
        state.pop("lm_head.weight", None)  # the embedding, stored once
    state = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", QUANT_KEY: quant["mode"]})
    write_json(directory / CONFIG_FILE, {"format": "custom-llm", "model": model.config.to_dict(), QUANT_KEY: quant})
    return directory


def load_quantized(directory: Path, device: str | torch.device = "cpu",
                   dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Build the quantized model stored in ``directory``, packed for ``device``; ``dtype``: float tensors'."""
    from safetensors.torch import load_file

    from ..model import Transformer
    from ..model.rope import RotaryEmbedding

    directory = Path(directory)
    data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    quant = data.get(QUANT_KEY) or {}
    if not isinstance(quant, dict) or "mode" not in quant:
        raise UserError(f"{directory / CONFIG_FILE}: malformed '{QUANT_KEY}' section (needs mode, group_size, head)")
    config = ModelConfig.from_dict(data["model"])
    head = bool(quant.get("head", True))
    with torch.device("meta"):
        model = Transformer(config)
        quantized_skeleton(model, quant["mode"], int(quant.get("group_size", 32)), head)
    model = model.to_empty(device="cpu")
    model.rope.inv_freq.copy_(RotaryEmbedding(config.resolved_head_dim, config.rope_theta).inv_freq)
    weights = directory / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except Exception as exc:  # missing, truncated or corrupt file
        raise UserError(f"cannot read {weights}: {exc}") from None
    tied = config.tie_embeddings and not head
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise UserError(f"{weights}: {what} for a {quant['mode']} checkpoint of this config")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise UserError(f"{weights}: {str(exc).splitlines()[-1].strip()}") from None
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return pack_for_device(model).eval()
