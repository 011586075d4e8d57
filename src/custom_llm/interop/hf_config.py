"""Our ModelConfig <-> Hugging Face ``config.json`` for Llama, Mistral, Mixtral and Qwen2-MoE.

Which architecture a model exports to follows from the model itself:

=============================================================  ====================
our config                                                     Hugging Face class
=============================================================  ====================
dense, full attention on every layer (q/k/v bias optional)     LlamaForCausalLM
dense, the same sliding window on every layer                  MistralForCausalLM
MoE on every layer, no shared expert, renormalised top-k       MixtralForCausalLM
MoE + one sigmoid-gated shared expert (dense layers, window    Qwen2MoeForCausalLM
pattern, q/k/v bias and renormalisation all optional)
=============================================================  ====================

Anything none of them represents exactly is refused with a :class:`UserError` naming the feature
(see :func:`choose_architecture`). Training-only settings (dropout, LayerDrop, router noise, gradient
checkpointing, loss coefficients) need no representation; ReZero scales are folded into the weights.
Only the standard library is used here: transformers is never needed to read or write these files.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import ModelConfig
from ..errors import UserError

# model_type -> (architecture class name, defaults of the fields we read when config.json omits them).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}),
    "mistral": ("MistralForCausalLM", {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                       "max_position_embeddings": 4096 * 32, "sliding_window": 4096}),
    "mixtral": ("MixtralForCausalLM", {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
                                       "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                          "max_position_embeddings": 32768, "num_experts": 60,
                                          "num_experts_per_tok": 4, "norm_topk_prob": False, "qkv_bias": True,
                                          "decoder_sparse_step": 1, "sliding_window": 4096,
                                          "max_window_layers": 28}),
}
SUPPORTED = ", ".join(f"{arch} ({mtype})" for mtype, (arch, _) in ARCHITECTURES.items())


def refuse(feature: str, why: str) -> UserError:
    """The error for a model feature that the target format cannot represent exactly."""
    return UserError(f"cannot export to Hugging Face: {feature} ({why})")


def choose_architecture(config: ModelConfig) -> str:
    """The HF model_type that represents ``config`` exactly, or a UserError naming what cannot be."""
    windows = config.layer_windows()
    uniform_window = len(set(windows)) == 1
    if config.n_experts == 0:
        if not uniform_window:
            raise refuse(f"per-layer window pattern (window_pattern={config.window_pattern!r}) on a dense model",
                         "Llama and Mistral use one attention span for every layer; Qwen2-MoE, which can, needs experts")
        if windows[0] is None:
            if config.d_model % config.n_heads:
                raise refuse(f"head_dim={config.head_dim} with d_model % n_heads != 0",
                             "Llama requires hidden_size divisible by num_attention_heads")
            return "llama"
        if config.attn_bias:
            raise refuse("attn_bias with a sliding window", "Mistral has no attention bias")
        return "mistral"
    if config.n_shared_experts == 0:
        problems = [
            (not uniform_window, f"per-layer window pattern (window_pattern={config.window_pattern!r})"),
            (config.moe_first_dense > 0 or config.moe_every > 1,
             f"dense layers between MoE layers (moe_first_dense={config.moe_first_dense}, moe_every={config.moe_every})"),
            (not config.moe_renormalize, "moe_renormalize=False"),
            (config.attn_bias, "attn_bias"),
        ]
        for bad, feature in problems:
            if bad:
                raise refuse(f"{feature} on an MoE without shared experts",
                             "Mixtral: every layer MoE, one window for all layers, renormalised top-k, no bias")
        return "mixtral"
    if not config.shared_expert_gate:
        raise refuse("ungated shared expert (shared_expert_gate=False)",
                     "Qwen2-MoE always scales its shared expert by a sigmoid gate")
    if config.resolved_head_dim != config.d_model // config.n_heads or config.d_model % config.n_heads:
        raise refuse(f"head_dim={config.resolved_head_dim} != d_model // n_heads",
                     "Qwen2-MoE derives its head width from hidden_size / num_attention_heads")
    if len({w for w in windows if w is not None}) > 1:
        raise refuse("different window sizes per layer", "Qwen2-MoE has one sliding_window")
    return "qwen2_moe"


def model_config_to_hf_config(config: ModelConfig, special_ids: Optional[dict] = None,
                              dtype: str = "float32") -> dict:
    """The HF ``config.json`` content for ``config`` (raises UserError for unrepresentable features)."""
    model_type = choose_architecture(config)
    special_ids = special_ids or {}
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type][0]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # read by transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    window = next((w for w in config.layer_windows() if w is not None), None)
    if model_type == "llama":
        hf.update(attention_bias=config.attn_bias, mlp_bias=False)
    elif model_type in ("mistral", "mixtral"):
        hf["sliding_window"] = window
    if model_type == "mixtral":
        hf.update(intermediate_size=config.resolved_moe_ffn_dim, num_local_experts=config.n_experts,
                  num_experts_per_tok=config.moe_top_k, router_jitter_noise=0.0,
                  router_aux_loss_coef=config.moe_aux_loss_coef, output_router_logits=False)
    if model_type == "qwen2_moe":
        del hf["head_dim"]
        is_moe = config.layer_is_moe()
        hf.update(moe_intermediate_size=config.resolved_moe_ffn_dim,
                  shared_expert_intermediate_size=config.resolved_shared_ffn_dim,
                  num_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
                  norm_topk_prob=config.moe_renormalize, decoder_sparse_step=1,
                  mlp_only_layers=[i for i, moe in enumerate(is_moe) if not moe],
                  qkv_bias=config.attn_bias, router_aux_loss_coef=config.moe_aux_loss_coef,
                  output_router_logits=False, use_sliding_window=window is not None,
                  sliding_window=window, max_window_layers=config.n_layers,
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in config.layer_windows()])
    return hf


def _rope_theta(hf: dict, defaults: dict, source: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: rope_parameters must be a mapping")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise UserError(f"{source}: RoPE scaling type {rope_type!r} is not supported (only plain RoPE)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"])))


def _window_pattern(windows: list[Optional[int]]) -> Optional[str]:
    """The shortest repeating 'S'/'L' pattern that reproduces ``windows`` (None: all sliding)."""
    letters = "".join("L" if w is None else "S" for w in windows)
    if set(letters) == {"S"}:
        return None
    for period in range(1, len(letters) + 1):
        pattern = letters[:period]
        if all(letters[i] == pattern[i % period] for i in range(len(letters))):
            return pattern
    return letters


def _moe_layout(is_moe: list[bool], source: str) -> tuple[int, int]:
    """(moe_first_dense, moe_every) reproducing a per-layer MoE/dense list, or a UserError."""
    n = len(is_moe)
    for first in range(n):
        for every in range(1, n + 1):
            if [i >= first and (i - first) % every == 0 for i in range(n)] == is_moe:
                return first, every
    raise UserError(f"{source}: the layout of MoE and dense layers {['moe' if m else 'dense' for m in is_moe]} "
                    "is not a 'first k dense, then every m-th' pattern")


def hf_config_to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF ``config.json`` dict of a supported architecture (else UserError)."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(hf.get("architectures") or []) or "?"
        raise UserError(f"{source}: unsupported architecture {arch} (model_type {model_type!r}); supported: {SUPPORTED}")
    defaults = ARCHITECTURES[model_type][1]

    def get(key: str, default: Any = None) -> Any:
        value = hf.get(key)
        return defaults.get(key, default) if value is None else value

    if get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true is not supported")
    _check_positive_ints(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                              "intermediate_size"), source)
    try:
        return _model_config(hf, model_type, defaults, get, source)
    except UserError:  # already names the problem (an invalid resulting ModelConfig, an unsupported feature)
        raise
    except (KeyError, TypeError, ValueError) as exc:  # a field of the wrong kind that the checks above do not cover
        what = f"missing field {exc}" if isinstance(exc, KeyError) else f"malformed field ({exc})"
        raise UserError(f"{source}: {what}") from None


def _check_positive_ints(hf: dict, keys: tuple, source: str) -> None:
    """One UserError naming every required size field that is missing or not a positive integer."""
    problems = []
    for key in keys:
        value = hf.get(key)
        if value is None:
            problems.append(f"{key} is missing")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} must be a positive integer (got {value!r})")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def _model_config(hf: dict, model_type: str, defaults: dict, get, source: str) -> ModelConfig:
    """The field mapping itself (sizes already checked by :func:`_check_positive_ints`)."""
    n_layers, n_heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    head_dim = get("head_dim") or hf["hidden_size"] // n_heads
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", n_heads), head_dim=head_dim, ffn_dim=hf["intermediate_size"],
        max_seq_len=get("max_position_embeddings"), tie_embeddings=bool(get("tie_word_embeddings", False)),
        norm_eps=float(get("rms_norm_eps")), rope_theta=_rope_theta(hf, defaults, source),
        init_std=float(get("initializer_range", 0.02)),
        attn_bias=bool(hf.get("attention_bias", False)) if model_type == "llama" else False,
    )
    windows: list[Optional[int]] = [None] * n_layers
    window = hf["sliding_window"] if "sliding_window" in hf else defaults.get("sliding_window")
    if model_type in ("mistral", "mixtral") and window:
        windows = [int(window)] * n_layers
    if model_type == "mixtral":
        fields.update(n_experts=get("num_local_experts"), moe_top_k=get("num_experts_per_tok"),
                      moe_ffn_dim=hf["intermediate_size"], moe_renormalize=True)
    if model_type == "qwen2_moe":
        fields.update(_qwen2_moe_fields(hf, get, n_layers, source))
        if get("use_sliding_window", False) and get("sliding_window"):
            types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 and i < get("max_window_layers") else "full_attention"
                for i in range(n_layers)]
            windows = [int(get("sliding_window")) if t == "sliding_attention" else None for t in types]
    if any(w is not None for w in windows):
        window = next(w for w in windows if w is not None)
        fields.update(sliding_window=window, window_pattern=_window_pattern(windows),
                      max_seq_len=max(fields["max_seq_len"], window))
    return ModelConfig(**fields)


def _qwen2_moe_fields(hf: dict, get, n_layers: int, source: str) -> dict:
    """The MoE part of a Qwen2-MoE config: experts, shared expert, and which layers are sparse."""
    step = int(get("decoder_sparse_step"))
    only_dense = set(hf.get("mlp_only_layers") or [])
    n_experts = int(get("num_experts"))
    is_moe = [i not in only_dense and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
    if not any(is_moe):
        raise UserError(f"{source}: a Qwen2-MoE config without any MoE layer is not supported")
    first, every = _moe_layout(is_moe, source)
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
    if shared <= 0:
        raise UserError(f"{source}: Qwen2-MoE without a shared expert is not supported")
    return dict(n_experts=n_experts, moe_top_k=get("num_experts_per_tok"), moe_ffn_dim=hf["moe_intermediate_size"],
                moe_first_dense=first, moe_every=every, moe_renormalize=bool(get("norm_topk_prob")),
                n_shared_experts=1, shared_expert_ffn_dim=shared, shared_expert_gate=True,
                attn_bias=bool(get("qkv_bias")))
