"""Our state dict <-> Hugging Face tensors, in the names the hub files use.

Our parameter names are Hugging Face Llama's without the ``model.`` prefix, so most tensors map one
to one. The differences, all handled by one table (:func:`tensor_map`):

* experts: we hold them stacked, ``mlp.experts.gate_up_proj`` (E, 2F, C) and ``mlp.experts.down_proj``
  (E, C, F); hub files hold one matrix per expert, ``block_sparse_moe.experts.{e}.w1/w3/w2`` (Mixtral) or
  ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` (Qwen2-MoE). transformers 5 fuses them in memory like
  ours; files saved that way (``experts.gate_up_proj``) are accepted on import too.
* the router: ``mlp.router`` here, ``gate`` there (``block_sparse_moe.gate`` in Mixtral files).
* ReZero (Bachlechner et al. 2020) scales each residual branch by a scalar; on export the scalar is
  folded into the branch's last linear map (o_proj; down_proj of the MLP, of every routed expert and
  of the shared expert), which is exact because nothing follows it inside the branch.
* a Llama with ``attention_bias`` also has an o_proj bias; ours has none, so it is exported as zeros.
* training-only tensors (the router's noise projection) are dropped.

Legend: E experts, F expert hidden width, C d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import UserError

# HF tensors that carry no weights (older files store RoPE tables) and are skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class TensorMap:
    """One of our tensors and the HF tensor(s) it becomes.

    kind: 'same' (one tensor, same shape), 'gate_up' (ours (E, 2F, C) <-> gate_e (F, C) for every e,
    then up_e (F, C)), 'stack' (ours (E, ...) <-> one tensor per expert), 'zero_bias' (HF only: an
    all-zero bias our model does not have).
    """

    ours: Optional[str]
    hf: list[str]
    kind: str = "same"
    scale: Optional[str] = None  # the ReZero scale folded into this tensor on export


def _moe_names(model_type: str, prefix: str, n_experts: int) -> dict[str, list[str]]:
    """HF names of one MoE layer's router and expert matrices in hub files."""
    if model_type == "mixtral":
        base = prefix.replace(".mlp.", ".block_sparse_moe.")
        expert = [f"{base}experts.{e}." for e in range(n_experts)]
        return {"router": [f"{base}gate.weight"], "gate": [p + "w1.weight" for p in expert],
                "up": [p + "w3.weight" for p in expert], "down": [p + "w2.weight" for p in expert]}
    expert = [f"{prefix}experts.{e}." for e in range(n_experts)]
    return {"router": [f"{prefix}gate.weight"], "gate": [p + "gate_proj.weight" for p in expert],
            "up": [p + "up_proj.weight" for p in expert], "down": [p + "down_proj.weight" for p in expert]}


def tensor_map(config: ModelConfig, model_type: str) -> list[TensorMap]:
    """Every weight of a model with ``config`` and its HF counterpart(s) for ``model_type``."""
    maps = [TensorMap("embed_tokens.weight", ["model.embed_tokens.weight"]),
            TensorMap("norm.weight", ["model.norm.weight"])]
    if not config.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", ["lm_head.weight"]))
    attn_scale = "attn_scale" if config.rezero else None
    mlp_scale = "mlp_scale" if config.rezero else None
    for i, is_moe in enumerate(config.layer_is_moe()):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        names += [f"self_attn.{p}_proj.weight" for p in "qkv"]
        if config.attn_bias:
            names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        maps += [TensorMap(ours + n, [hf + n]) for n in names]
        maps.append(TensorMap(ours + "self_attn.o_proj.weight", [hf + "self_attn.o_proj.weight"],
                              scale=attn_scale and ours + attn_scale))
        if config.attn_bias and model_type == "llama":
            maps.append(TensorMap(None, [hf + "self_attn.o_proj.bias"], kind="zero_bias"))
        scale = mlp_scale and ours + mlp_scale
        if not is_moe:
            maps += [TensorMap(ours + f"mlp.{p}_proj.weight", [hf + f"mlp.{p}_proj.weight"],
                               scale=scale if p == "down" else None) for p in ("gate", "up", "down")]
            continue
        moe = _moe_names(model_type, hf + "mlp.", config.n_experts)
        maps += [TensorMap(ours + "mlp.router.weight", moe["router"]),
                 TensorMap(ours + "mlp.experts.gate_up_proj", moe["gate"] + moe["up"], kind="gate_up"),
                 TensorMap(ours + "mlp.experts.down_proj", moe["down"], kind="stack", scale=scale)]
        if config.n_shared_experts:
            maps += [TensorMap(ours + f"mlp.shared_expert.{p}_proj.weight", [hf + f"mlp.shared_expert.{p}_proj.weight"],
                               scale=scale if p == "down" else None) for p in ("gate", "up", "down")]
            maps.append(TensorMap(ours + "mlp.shared_expert_gate.weight", [hf + "mlp.shared_expert_gate.weight"]))
    return maps


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (hub names), ReZero folded, training-only tensors dropped."""
    out: dict[str, torch.Tensor] = {}
    for m in tensor_map(config, model_type):
        if m.kind == "zero_bias":
            out[m.hf[0]] = torch.zeros(config.d_model, dtype=state["norm.weight"].dtype)
            continue
        t = state[m.ours].detach()
        if m.scale is not None:
            t = t * state[m.scale].detach().to(t.dtype)  # ReZero: scale * W x == (scale * W) x
        if m.kind == "same":
            out[m.hf[0]] = t
        elif m.kind == "stack":
            out.update(zip(m.hf, t.unbind(0)))
        else:  # gate_up: (E, 2F, C) -> E gate (F, C), then E up (F, C)
            gate, up = t.chunk(2, dim=1)
            out.update(zip(m.hf, list(gate.unbind(0)) + list(up.unbind(0))))
    return {name: t.contiguous().cpu() for name, t in out.items()}


def _hf_shapes(m: TensorMap, our_shape: tuple) -> list[tuple]:
    """The shape each HF tensor of ``m`` must have, given our tensor's shape."""
    if m.kind == "same":
        return [our_shape]
    if m.kind == "stack":
        return [our_shape[1:]] * our_shape[0]
    e, two_f, c = our_shape
    return [(two_f // 2, c)] * (2 * e)


def from_hf_state(hf: dict[str, torch.Tensor], config: ModelConfig, model_type: str, our_shapes: dict[str, tuple],
                  source: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict; a missing, unexpected or mis-shaped tensor is a UserError naming it."""
    hf = {k: v for k, v in hf.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some files store the tied head as well
    if model_type == "mixtral":  # the router's in-memory name in transformers 5
        hf = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in hf.items()}
    state, used = {}, set()
    for m in tensor_map(config, model_type):
        if m.kind == "zero_bias":
            bias = _take(hf, m.hf[0], (config.d_model,), source, used)
            if bias.abs().max() > 0:
                raise UserError(f"{source}: {m.hf[0]} is not zero; custom-llm has no o_proj bias")
            continue
        shapes = _hf_shapes(m, our_shapes[m.ours])
        fused = _fused_name(m)
        if fused is not None and fused in hf:
            state[m.ours] = _take(hf, fused, our_shapes[m.ours], source, used)
            continue
        parts = [_take(hf, name, shape, source, used) for name, shape in zip(m.hf, shapes)]
        if m.kind == "same":
            state[m.ours] = parts[0]
        elif m.kind == "stack":
            state[m.ours] = torch.stack(parts)
        else:
            e = len(parts) // 2
            state[m.ours] = torch.cat([torch.stack(parts[:e]), torch.stack(parts[e:])], dim=1)  # (E, 2F, C)
    leftover = sorted(set(hf) - used)
    if leftover:
        raise UserError(f"{source}: unexpected tensor {leftover[0]}"
                        + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""))
    return state


def _fused_name(m: TensorMap) -> Optional[str]:
    """The transformers-5 in-memory name of a stacked expert tensor (``...mlp.experts.gate_up_proj``)."""
    if m.kind not in ("gate_up", "stack"):
        return None
    layer = m.hf[0].split(".experts.")[0].replace(".block_sparse_moe", ".mlp")
    return f"{layer}.experts.{'gate_up_proj' if m.kind == 'gate_up' else 'down_proj'}"


def _take(hf: dict, name: str, shape: tuple, source: str, used: set) -> torch.Tensor:
    if name not in hf:
        raise UserError(f"{source}: missing tensor {name} (expected shape {tuple(shape)})")
    t = hf[name]
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    used.add(name)
    return t


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder: ``model.safetensors`` or the shards its index file lists."""
    from safetensors.torch import load_file

    from ..checkpoint_io import read_json

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' mapping")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = "pytorch_model.bin" if (folder / "pytorch_model.bin").is_file() else "no weights"
        raise UserError(f"{folder}: expected model.safetensors or model.safetensors.index.json (found {found}; "
                        "pickled .bin weights are not read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"missing weight shard: {path}")
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {path}: {exc}") from None
    return tensors
