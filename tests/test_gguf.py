"""GGUF export read back with gguf.GGUFReader: metadata, tokenizer, tensors (q/k permutation checked against an
independent interleaved-RoPE reference), Q8_0, MoE experts, refusals, the CLI. llama.cpp itself: test_gguf_llamacpp.py."""

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from custom_llm import ModelConfig, Transformer  # noqa: E402
from custom_llm.errors import UserError  # noqa: E402
from custom_llm.interop.gguf import export_gguf, permute_for_interleaved_rope  # noqa: E402
from custom_llm.model.rope import RotaryEmbedding, apply_rotary  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! It's 2024, isn't it?\n  Indented line."]


def _config(**kw):
    base = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bpe():
    from custom_llm.tokenizers.bpe import BPETokenizer

    return BPETokenizer.train(TEXT * 20, vocab_size=300)


def _fields(reader):
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - header fields without contents()
            pass
    return out


def _interleaved_rope(x, positions, base=10000.0):
    """llama.cpp's llama RoPE: rotate the adjacent pairs (2i, 2i+1) of each head by pos * base^(-2i/D)."""
    D = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)  # (D/2,)
    ang = positions.float()[:, None] * inv  # (T, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * ang.cos() - odd * ang.sin()
    out[..., 1::2] = even * ang.sin() + odd * ang.cos()
    return out


def test_permutation_turns_rotate_half_rope_into_interleaved_rope():
    H, D, C, T = 3, 8, 16, 5
    w, x = torch.randn(H * D, C), torch.randn(T, C)
    positions = torch.arange(T) + 3
    cos, sin = RotaryEmbedding(D)(positions)  # (T, D)
    ours = apply_rotary((x @ w.t()).view(T, H, D).transpose(0, 1), cos, sin)  # (H, T, D), rotate-half
    theirs = _interleaved_rope((x @ permute_for_interleaved_rope(w, H).t()).view(T, H, D).transpose(0, 1), positions)
    # Same attention scores: the permutation reorders each head's dimensions identically for q and k.
    perm = permute_for_interleaved_rope(torch.arange(H * D).float().view(-1, 1), H).view(H, D)[0].long()
    torch.testing.assert_close(theirs, ours[..., perm])


def test_dense_export_reads_back(tmp_path, bpe):
    torch.manual_seed(0)
    model = Transformer(_config()).eval()
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    reader = gguf.GGUFReader(str(path))
    f = _fields(reader)
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.embedding_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (64, 4, 2)
    assert f["llama.context_length"] == 64 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 384 and tokens[bpe.eos_id] == "<|eos|>" and tokens[-1] == "[PAD383]" and bpe.vocab_size == 320
    vocab = bpe.hf.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.eos_token_id"] == bpe.eos_id and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == bpe.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9
    state = model.state_dict()
    q = torch.from_numpy(tensors["blk.1.attn_q.weight"].data.copy()).float()
    assert tensors["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    torch.testing.assert_close(q, permute_for_interleaved_rope(state["layers.1.self_attn.q_proj.weight"], 4),
                               rtol=1e-3, atol=1e-4)
    k = torch.from_numpy(tensors["blk.0.attn_k.weight"].data.copy()).float()
    torch.testing.assert_close(k, permute_for_interleaved_rope(state["layers.0.self_attn.k_proj.weight"], 2),
                               rtol=1e-3, atol=1e-4)
    out = torch.from_numpy(tensors["output.weight"].data.copy()).float()
    torch.testing.assert_close(out, state["lm_head.weight"], rtol=1e-3, atol=1e-4)


def test_q8_0_and_tied_head(tmp_path, bpe):
    torch.manual_seed(1)
    model = Transformer(_config(tie_embeddings=True)).eval()
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "q.gguf", tokenizer=bpe, quant="q8_0")))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).view(64, -1)
    w = model.state_dict()["layers.0.mlp.down_proj.weight"]
    assert (deq - w).abs().max() < w.abs().max() / 127  # one int8 step of the block scale at most


def test_moe_exports_stacked_experts(tmp_path, bpe):
    torch.manual_seed(2)
    model = Transformer(_config(n_experts=4, moe_top_k=2, moe_ffn_dim=32)).eval()
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "moe.gguf", tokenizer=bpe)))
    f = _fields(reader)
    assert f["llama.expert_count"] == 4 and f["llama.expert_used_count"] == 2 and f["llama.feed_forward_length"] == 32
    tensors = {t.name: t for t in reader.tensors}
    experts = model.layers[1].mlp.experts
    gate = torch.from_numpy(tensors["blk.1.ffn_gate_exps.weight"].data.copy()).float()  # (E, F, C)
    up = torch.from_numpy(tensors["blk.1.ffn_up_exps.weight"].data.copy()).float()
    down = torch.from_numpy(tensors["blk.1.ffn_down_exps.weight"].data.copy()).float()  # (E, C, F)
    torch.testing.assert_close(torch.cat([gate, up], dim=1), experts.gate_up_proj.detach(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(down, experts.down_proj.detach(), rtol=1e-3, atol=1e-4)
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("kw,message", [(dict(sliding_window=16), "sliding window"),
                                        (dict(n_experts=4, moe_ffn_dim=32, n_shared_experts=1, shared_expert_gate=True),
                                         "shared experts")])
def test_refusals(tmp_path, bpe, kw, message):
    with pytest.raises(UserError, match=message):
        export_gguf(Transformer(_config(**kw)), tmp_path / "x.gguf", tokenizer=bpe)
    assert not list(tmp_path.iterdir())


def test_char_tokenizer_ascii_only(tmp_path):
    from custom_llm.tokenizers.char import CharTokenizer

    ascii_tok = CharTokenizer.train(["hello world!"])
    model = Transformer(_config(vocab_size=64)).eval()
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "c.gguf", tokenizer=ascii_tok)))
    tokens = _fields(reader)["tokenizer.ggml.tokens"]
    assert tokens[ascii_tok.encode(" ")[0]] == "\u0120" and tokens[ascii_tok.encode("h")[0]] == "h"
    with pytest.raises(UserError, match="ASCII"):
        export_gguf(model, tmp_path / "d.gguf", tokenizer=CharTokenizer.train(["héllo"]))


def test_cli_export_gguf(tmp_path, bpe, capsys):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.cli import main

    save_model(Transformer(_config()), tmp_path / "ckpt")
    bpe.save(tmp_path / "ckpt")
    out = tmp_path / "model.gguf"
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
