"""GGUF export for llama.cpp (and Ollama, LM Studio, ...), written with the ``gguf`` package.

What is written:

* architecture ``llama``: dense models (Llama, and Mistral-style when the window covers the whole
  context) and Mixtral-style mixtures of experts (every layer MoE, renormalised top-k, stacked expert
  tensors ``ffn_{gate,up,down}_exps``). What llama.cpp's ``llama`` graph cannot run is refused:
  sliding windows shorter than the context, shared experts, attention biases.
* tensors from :func:`~.hf_weights.to_hf_state` (the Hugging Face export's, ReZero folded in) under
  llama.cpp's names, with the q/k rows permuted: our RoPE rotates the pairs (i, i + D/2) of each head
  (rotate-half, as Hugging Face), llama.cpp's ``llama`` rotates the adjacent pairs (2i, 2i + 1), so
  row i + D/2 of each head must move next to row i (the convention of llama.cpp's
  ``convert_hf_to_gguf.py``). ``--quant f16``: matrices in F16, norms and the router in F32;
  ``q8_0``: matrices in Q8_0 (blocks of 32 with one scale) where rows divide into blocks, else F16.
* the byte-level BPE tokenizer as ``tokenizer.ggml.model = "gpt2"`` with vocabulary, merges and
  token types; the pre-tokenizer declared as llama.cpp's ``gpt-2``, whose regex is GPT-2's, the one
  ours uses. Ours caps each run of one character class at 128 characters (see tokenizers/bpe.py), so
  the two split differently only inside runs longer than 128 letters, digits, symbols or spaces.
  A character tokenizer is written the same way (one token per character, no merges) when every
  character is ASCII; otherwise it is refused (llama.cpp would need byte tokens it does not have).
  Special tokens (bos, eos, pad, unk, end of turn) and the chat template go into the metadata.

Legend: H heads, D head dim, C d_model, E experts, F expert hidden width.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import UserError

QUANTS = ("f16", "q8_0")
PRE_TOKENIZER = "gpt-2"
_NAMES = [  # Hugging Face hub name (Llama / Mixtral) -> llama.cpp name
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{0}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{0}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{0}.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{0}.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{0}.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "blk.{0}.ffn_gate_inp.weight"),
]
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows (H*D, C) from rotate-half order to adjacent pairs: head row 2i <- i, 2i + 1 <- i + D/2."""
    rows = w.shape[0]
    d_half = rows // n_heads // 2
    return w.reshape(n_heads, 2, d_half, -1).transpose(1, 2).reshape(w.shape)  # (H, 2, D/2, C) -> (H, D/2, 2, C)


def check_exportable(config) -> None:
    """UserError naming what llama.cpp's ``llama`` architecture cannot represent."""
    from .hf_config import choose_architecture

    arch = choose_architecture(config)  # refuses what no Llama/Mixtral folder can hold either
    problems = [
        (arch == "qwen2_moe", "shared experts (Qwen2-MoE style)"),
        (any(w is not None and w < config.max_seq_len for w in config.layer_windows()),
         f"a sliding window ({config.sliding_window}) shorter than the context ({config.max_seq_len})"),
        (config.attn_bias, "attention biases (attn_bias)"),
    ]
    for bad, what in problems:
        if bad:
            raise UserError(f"GGUF export: llama.cpp's llama architecture cannot represent {what}")


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp names (fp32, q/k permuted, experts stacked)."""
    from .hf_weights import to_hf_state

    from .hf_config import choose_architecture

    config = model.config
    state = {name: t.detach().float() for name, t in model.state_dict().items()}
    hf = to_hf_state(state, config, choose_architecture(config))
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        if match := _EXPERT.fullmatch(name):
            layer, expert, which = int(match[1]), int(match[2]), match[3]
            experts.setdefault((layer, _EXPERT_NAMES[which]), {})[expert] = t
            continue
        target = next((fmt.format(*m.groups()) for pattern, fmt in _NAMES if (m := re.fullmatch(pattern, name))), None)
        if target is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {name}")
        if target.endswith("attn_q.weight"):
            t = permute_for_interleaved_rope(t, config.n_heads)
        elif target.endswith("attn_k.weight"):
            t = permute_for_interleaved_rope(t, config.n_kv_heads)
        out[target] = t
    for (layer, kind), per_expert in sorted(experts.items()):
        out[f"blk.{layer}.{kind}.weight"] = torch.stack([per_expert[e] for e in sorted(per_expert)])  # (E, ., .)
    return out


def _tokenizer_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in llama.cpp's ``gpt2`` form, padded to the model's vocabulary."""
    import gguf

    data = json.loads(tokenizer.to_json_str())
    if tokenizer.kind == "char":
        chars = tokenizer.chars if not callable(tokenizer.chars) else tokenizer.chars()
        if any(ord(c) >= 128 for c in chars):
            raise UserError("GGUF export: a character tokenizer is written for llama.cpp only when every character is "
                            "ASCII (llama.cpp would need byte tokens for the others); use a BPE tokenizer")
        tokens = [None] * tokenizer.vocab_size
        for text, i in tokenizer.special_tokens().items():
            tokens[i] = text
        for c in chars:
            tokens[tokenizer.encode(c)[0]] = _byte_level(c)
        merges: list[str] = []
    else:
        model = data.get("model") or {}
        pre = json.dumps(data.get("pre_tokenizer"))
        from ..tokenizers.bpe import PIECE_REGEX

        if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel" or json.dumps(PIECE_REGEX) not in pre:
            raise UserError("GGUF export: only byte-level BPE tokenizers with GPT-2 pieces (those trained here) are "
                            "supported; this tokenizer's pre-tokenizer has no llama.cpp equivalent we could vouch for")
        tokens = [None] * tokenizer.vocab_size
        for text, i in model["vocab"].items():
            tokens[i] = text
        for added in data.get("added_tokens") or []:
            tokens[added["id"]] = added["content"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = set(tokenizer.special_tokens().values())
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    if any(t is None for t in tokens):
        raise UserError("GGUF export: the tokenizer's ids are not contiguous")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (vocabulary rounding)
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, types, merges


def _byte_level(text: str) -> str:
    """GPT-2's byte-to-printable mapping of text's UTF-8 bytes (how a gpt2 vocabulary spells tokens)."""
    from ..tokenizers.bpe import _byte_decoder

    encoder = {b: c for c, b in _byte_decoder().items()}
    return "".join(encoder[b] for b in text.encode("utf-8"))


def write_gguf(model: torch.nn.Module, tokenizer, path: Union[str, Path], quant: str = "f16",
               name: str = "custom-llm") -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``path`` (written aside, then renamed)."""
    import gguf

    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)} (got {quant!r})")
    if getattr(model, "quantization", None):
        raise UserError("GGUF export needs the float checkpoint, not an int8/int4 one (use --quant q8_0 instead)")
    config = model.config
    check_exportable(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    tokens, types, merges = _tokenizer_vocab(tokenizer, config.vocab_size)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_metadata(writer, config, quant, name)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp refuses a gpt2 vocabulary without merges; a character vocabulary gets one that can never
        # apply ("\u0100\u0100" is no initial symbol and no merge creates it), so no two characters merge.
        writer.add_token_merges(merges or ["\u0100\u0100 \u0100\u0100"])
        _write_special_tokens(writer, tokenizer)
        for tensor_name, t in gguf_tensors(model).items():
            _add_tensor(writer, tensor_name, t, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_metadata(writer, config, quant: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.resolved_head_dim)
    writer.add_value_length(config.resolved_head_dim)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.n_experts:
        writer.add_feed_forward_length(config.resolved_moe_ffn_dim)
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.moe_top_k)
    else:
        writer.add_feed_forward_length(config.resolved_ffn_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_special_tokens(writer, tokenizer) -> None:
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{role}_id", None)
        if token_id is not None and token_id >= 0:
            add(token_id)
    end_of_turn = sorted(tokenizer.end_of_turn_ids)
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(False)  # prompts get no automatic BOS: the caller adds the start token it wants
    writer.add_add_eos_token(False)
    template: Optional[str] = tokenizer.chat_template
    if template:
        writer.add_chat_template(template)


def _add_tensor(writer, name: str, t: torch.Tensor, quant: str) -> None:
    """Norms and the router in F32; matrices in F16, or Q8_0 where their rows split into blocks of 32."""
    import gguf

    array = t.float().numpy()
    if array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        writer.add_tensor(name, array.astype(np.float32))
    elif quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def export_gguf(source: Union[str, Path, torch.nn.Module], out: Union[str, Path], tokenizer=None,
                quant: str = "f16") -> Path:
    """Export a checkpoint (or run directory, or model with ``tokenizer``) to the GGUF file ``out``."""
    from .hf import _load_source

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the 'gguf' package: pip install gguf") from None
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the path of the .gguf file to write")
    if not isinstance(source, torch.nn.Module):
        from ..checkpoint_io import CONFIG_FILE, read_json, resolve_checkpoint_dir

        if "quantization" in read_json(resolve_checkpoint_dir(Path(source)) / CONFIG_FILE):
            raise UserError("GGUF export needs the float checkpoint, not an int8/int4 one (use --quant q8_0 instead)")
    model, tokenizer = _load_source(source, tokenizer)
    if tokenizer is None:
        raise UserError("GGUF export needs the checkpoint's tokenizer (tokenizer.json)")
    return write_gguf(model, tokenizer, out, quant)
