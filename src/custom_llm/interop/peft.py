"""LoRA adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names are PEFT's for the exported Hugging Face architecture: our module ``layers.3.self_attn.q_proj``
is ``model.layers.3.self_attn.q_proj`` there, and PEFT stores its adapter as
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (the adapter name "default" is
left out of the file). So ``peft.PeftModel.from_pretrained(exported_hf_model, adapter_dir)`` runs our
adapter, and an adapter PEFT trained on an exported model loads here.

Trained token rows (:class:`~custom_llm.model.lora.TrainableRows`) are PEFT's
``trainable_token_indices``: ``...embed_tokens.token_adapter.trainable_tokens_delta`` holds the rows
themselves (they replace the base rows); an untied head has its own under ``lm_head``.

ReZero (our per-block residual scales) is folded into o_proj / down_proj on export; the same scale
multiplies lora_B of those modules here, and divides it on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from ..checkpoint_io import write_json
from ..errors import UserError
from ..model.lora import (ATTENTION_TARGETS, MLP_TARGETS, LoRAConfig, TrainableRows, apply_lora, lora_modules,
                          merge_lora)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKEN_KEY = "token_adapter.trainable_tokens_delta"


def hf_module_name(ours: str) -> str:
    """Our module path -> the exported HF model's (``layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``)."""
    return ours if ours == "lm_head" else "model." + ours


def _rezero_scale(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The ReZero scale export folds into module ``name`` (o_proj: attn_scale, down_proj: mlp_scale), or None."""
    if not getattr(model.config, "rezero", False) or not name.startswith("layers."):
        return None
    block = model.layers[int(name.split(".")[1])]
    if name.endswith("self_attn.o_proj"):
        return block.attn_scale.detach().float()
    if name.endswith("down_proj") and ".experts." not in name:
        return block.mlp_scale.detach().float()
    return None


def _token_rows(model: nn.Module) -> Dict[str, TrainableRows]:
    """The TrainableRows modules that own their rows (a tied head shares the embedding's)."""
    found = {n: getattr(model, n, None) for n in ("embed_tokens", "lm_head")}
    return {n: m for n, m in found.items() if isinstance(m, TrainableRows) and not m._shared}


def save_adapter(model: nn.Module, lora: LoRAConfig, out_dir: Union[str, Path],
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s adapters (and trained token rows) as a PEFT adapter folder."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in lora_modules(model).items():
        key = PREFIX + hf_module_name(name)
        scale = _rezero_scale(model, name)
        b = module.lora_B.weight.detach().float()
        tensors[f"{key}.lora_A.weight"] = module.lora_A.weight.detach().float()
        tensors[f"{key}.lora_B.weight"] = b * scale if scale is not None else b
    rows = _token_rows(model)
    for name, module in rows.items():
        tensors[f"{PREFIX}{hf_module_name(name)}.{TOKEN_KEY}"] = module.rows.detach().float()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
              "trainable_token_indices": ({n: rows[n].token_indices.tolist() for n in rows} or None)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    write_json(out / CONFIG_FILE, config)
    return out


def read_adapter_config(adapter_dir: Union[str, Path]) -> tuple[LoRAConfig, Dict[str, list]]:
    """(LoRA settings, trainable token indices by module) from a PEFT ``adapter_config.json``."""
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable PEFT adapter config ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: only LoRA adapters are supported (peft_type {config.get('peft_type')!r})")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "modules_to_save") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise UserError(f"{path}: unsupported LoRA options {unsupported or ['bias']}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise UserError(f"{path}: target_modules as a regular expression is not supported; list module names")
    known = set(ATTENTION_TARGETS + MLP_TARGETS)
    if not targets or set(targets) - known:
        raise UserError(f"{path}: target_modules {targets} must be among {', '.join(sorted(known))}")
    tokens = config.get("trainable_token_indices") or {}
    if isinstance(tokens, list):
        tokens = {"embed_tokens": tokens}
    return LoRAConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout", 0.0)), targets=list(targets)), tokens


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: Union[str, Path]) -> nn.Module:
    """Wrap ``model`` with the adapter in ``adapter_dir`` (ours or trained with PEFT); returns ``model``."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    lora, tokens = read_adapter_config(adapter_dir)
    indices = tokens.get("embed_tokens", [])
    if set(tokens) - {"embed_tokens", "lm_head"} or ("lm_head" in tokens and tokens["lm_head"] != indices):
        raise UserError(f"{adapter_dir}: trainable tokens are supported on embed_tokens (and lm_head, same ids)")
    try:
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for a bad file
        raise UserError(f"{adapter_dir / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from None
    tensors = {k.replace(".default.", ".").replace(".default", ""): v for k, v in tensors.items()}
    apply_lora(model, lora, indices, head_rows="lm_head" in tokens)
    expected = {}
    for name, module in lora_modules(model).items():
        key = PREFIX + hf_module_name(name)
        expected[f"{key}.lora_A.weight"] = (module.lora_A.weight, None)
        expected[f"{key}.lora_B.weight"] = (module.lora_B.weight, _rezero_scale(model, name))
    for name, module in _token_rows(model).items():
        expected[f"{PREFIX}{hf_module_name(name)}.{TOKEN_KEY}"] = (module.trainable_tokens_delta, None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{adapter_dir}: adapter does not match the model (missing {missing[:3]}, unexpected "
                        f"{extra[:3]})")
    for key, (param, scale) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{adapter_dir}: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
        if scale is not None:
            if bool((scale == 0).any()):
                raise UserError(f"{adapter_dir}: {key} cannot be loaded into a block whose ReZero scale is 0")
            value = value / scale
        param.copy_(value.to(param.dtype))
    return model


def is_lora_checkpoint(folder: Union[str, Path]) -> bool:
    """True for a LoRA fine-tune's checkpoint: adapter tensors in its weights, or a PEFT adapter beside them."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return True
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), "pt") as handle:
            return any(key.endswith(".lora_A.weight") for key in handle.keys())
    except Exception:  # an unreadable file is the regular loader's error to report
        return False


def load_lora_checkpoint(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                         dtype: Optional[torch.dtype] = None, merge: bool = True) -> nn.Module:
    """The model of a LoRA checkpoint with its adapters (folded into the weights unless ``merge`` is False).

    Two layouts: the one fine-tuning writes (``model.safetensors`` holds the wrapped model: base weights,
    adapters and their scale), or plain base weights with a PEFT adapter folder's two files beside them.
    """
    from safetensors.torch import load_file

    from ..checkpoint_io import build_model, load_checkpoint_model, load_state_into, read_model_config
    from ..model.lora import lora_from_state, strip_adapters

    folder = Path(folder)
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for missing or corrupt files
        raise UserError(f"cannot read {weights}: {exc}") from None
    if any(key.endswith(".lora_A.weight") for key in state):
        lora, indices = lora_from_state(state)
        model = build_model(read_model_config(folder), strip_adapters(state), str(weights))
        apply_lora(model, lora, indices, head_rows="lm_head.trainable_tokens_delta" in state)
        load_state_into(model, state, str(weights))
    else:
        model = load_adapter(load_checkpoint_model(folder), folder)
    model = merge_lora(model) if merge else model
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def export_lora_checkpoint(ckpt_dir: Union[str, Path], out_dir: Union[str, Path], merge: bool,
                           dtype: Optional[str] = None) -> Path:
    """Export a LoRA fine-tune: merged weights, or the base model plus ``OUT/adapter`` in PEFT's format."""
    from ..checkpoint_io import build_model, read_model_config
    from ..model.lora import base_state_dict, lora_from_state
    from ..tokenizers import load_tokenizer
    from .hf import export_hf

    ckpt_dir = Path(ckpt_dir)
    model = load_lora_checkpoint(ckpt_dir, merge=False)
    tokenizer = load_tokenizer(ckpt_dir) if (ckpt_dir / "tokenizer.json").is_file() else None
    if merge:
        return export_hf(merge_lora(model), out_dir, tokenizer=tokenizer, dtype=dtype)
    base = build_model(read_model_config(ckpt_dir), base_state_dict(model), str(ckpt_dir))
    out = export_hf(base, out_dir, tokenizer=tokenizer, dtype=dtype)
    lora, _ = lora_from_state(model.state_dict())
    save_adapter(model, lora, out / "adapter")
    return out
