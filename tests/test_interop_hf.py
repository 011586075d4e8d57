"""Hugging Face interchange, checked against transformers itself (tiny random models, CPU, offline).

Import: an HF model of each supported architecture, saved with ``save_pretrained``, loads into our
Transformer with the same logits and the same greedy continuation. Export: a model trained here for a
few steps (ReZero on, so the scale fold is exercised with non-zero scales) loads in
``AutoModelForCausalLM`` with no missing or unexpected tensors and the same logits, and its tokenizer
loads in ``AutoTokenizer`` and encodes like ours.
"""

from __future__ import annotations

import pytest
import torch

from custom_llm import ModelConfig, Transformer, load_model
from custom_llm.checkpoint_io import save_model
from custom_llm.cli import main
from custom_llm.tokenizers import CharTokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak!  ä€ 12"
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager")
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
HF_CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, rope_theta=500.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6, rope_theta=2000.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, **MOE, decoder_sparse_step=2, use_sliding_window=True, sliding_window=6,
                       max_window_layers=3, norm_topk_prob=False)),
}


def _hf_model(arch: str, **overrides):
    """A random HF model; norms and biases randomised so a weight we fail to copy shows in the logits."""
    config_cls, model_cls, kw = HF_CASES[arch]
    torch.manual_seed(1)
    config = getattr(transformers, config_cls)(**{**BASE, **kw, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Our greedy continuation: the KV-cache engine when present, else a full-forward argmax loop."""
    try:
        from custom_llm.generation import generate
    except ImportError:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids[0, len(prompt):].tolist()
    return generate(model, [prompt], n)[0]


@pytest.mark.parametrize("arch", list(HF_CASES))
def test_import_matches_hf_logits_and_greedy(arch, tmp_path):
    hf = _hf_model(arch)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert type(ours) is Transformer
    ids = torch.randint(0, 96, (2, 20))  # longer than the windows, so they matter
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[0, :10].tolist()
    prompt_ids = torch.tensor([prompt])  # an explicit mask: HF would otherwise take id 0 for padding
    expected = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12,
                           do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert _greedy(ours, prompt, 12) == expected


def test_import_cli_writes_checkpoint_with_tokenizer(tmp_path, capsys):
    hf = _hf_model("qwen2_moe", qkv_bias=False, mlp_only_layers=[0], decoder_sparse_step=1, use_sliding_window=False)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer = CharTokenizer.train([SAMPLE])
    from custom_llm.interop import export_tokenizer

    export_tokenizer(tokenizer, tmp_path / "hf", max_length=64)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model = load_model(tmp_path / "ckpt")
    assert model.config.layer_is_moe() == [False, True, True] and not model.config.attn_bias
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    from custom_llm import load_tokenizer

    back = load_tokenizer(tmp_path / "ckpt")
    assert back.kind == "char" and back.encode(SAMPLE) == tokenizer.encode(SAMPLE)


def test_import_sharded_and_fused_expert_files(tmp_path):
    from safetensors.torch import save_file

    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 holds experts fused in memory (experts.gate_up_proj); files written that way load too.
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        expected = hf(ids).logits
        for folder in ("sharded", "fused"):
            torch.testing.assert_close(load_model(tmp_path / folder)(ids), expected, atol=1e-5, rtol=0)


# --- export: train here, load in transformers ---------------------------------------------------------------

def _train(config: ModelConfig, tokens: torch.Tensor, steps: int = 4) -> Transformer:
    """A few AdamW steps on ``tokens`` (lr high enough to move ReZero scales well away from 0)."""
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x, y = tokens[:, :-1], tokens[:, 1:]
    for _ in range(steps):
        loss = model.compute_loss(x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


EXPORT_CASES = {
    # family: (model fields beyond the sizes, tokenizer kind, expected HF class)
    "llama": (dict(rezero=True, tie_embeddings=True, attn_bias=True), "bpe", "LlamaForCausalLM"),
    "mistral": (dict(sliding_window=8, tie_embeddings=False, layerdrop=0.2), "char", "MistralForCausalLM"),
    "mixtral": (dict(n_experts=4, moe_top_k=2, moe_ffn_dim=24, moe_noisy_gating=True, sliding_window=8),
                "char", "MixtralForCausalLM"),
    "qwen2_moe": (dict(n_experts=4, moe_top_k=2, moe_ffn_dim=24, n_shared_experts=1, shared_expert_gate=True,
                       moe_first_dense=1, moe_renormalize=False, attn_bias=True, rezero=True, sliding_window=8,
                       window_pattern="LS"), "bpe", "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("family", list(EXPORT_CASES))
def test_export_trained_model_loads_in_transformers(family, tmp_path):
    fields, kind, hf_class = EXPORT_CASES[family]
    text = SAMPLE * 16
    tokenizer = train_tokenizer([text], kind=kind, vocab_size=320) if kind == "bpe" else CharTokenizer.train([text])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_dim=48, max_seq_len=64, norm_eps=1e-6, rope_theta=1000.0, **fields)
    tokens = torch.tensor(tokenizer.encode(text)[:4 * 33]).view(4, 33)
    model = _train(config, tokens)
    if config.rezero:
        assert min(abs(b.attn_scale.item()) for b in model.layers) > 1e-3  # the fold is really exercised
    save_model(model, tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                 attn_implementation="eager")
    assert type(hf).__name__ == hf_class
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    ids = tokens[:2, :24]
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-5, rtol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert hf_tok.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
