"""Logit parity with Hugging Face Llama and Mistral built from tiny random configs (the oracle)."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def _randomize_norms(hf_model):
    """Give every RMSNorm weight non-trivial values so a weight we fail to copy shows in the logits."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))


def _copy_hf_weights(hf_model, model):
    """Hugging Face Llama names are ours with a 'model.' prefix on everything but lm_head."""
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing


def _config_pair(tied: bool, window=None):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
              rope_theta=500.0, tie_word_embeddings=tied, attn_implementation="eager")
    ours = ModelConfig(vocab_size=96, d_model=64, ffn_dim=160, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                       max_seq_len=64, norm_eps=1e-6, rope_theta=500.0, tie_embeddings=tied, sliding_window=window)
    return kw, ours


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_llama_logits_match(tied, backend):
    kw, ours = _config_pair(tied)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    _randomize_norms(hf)
    ours.attn_backend = backend
    model = Transformer(ours).eval()
    _copy_hf_weights(hf, model)
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_mistral_sliding_window_logits_match(backend):
    kw, ours = _config_pair(tied=False, window=8)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **kw)).eval()
    _randomize_norms(hf)
    ours.attn_backend = backend
    model = Transformer(ours).eval()
    _copy_hf_weights(hf, model)
    ids = torch.randint(0, 96, (2, 40))  # 40 > window, so the window matters
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
        full = Transformer(ModelConfig(**{**ours.to_dict(), "sliding_window": None})).eval()
        _copy_hf_weights(hf, full)
        assert (full(ids) - expected).abs().max() > 1e-3  # the oracle does depend on the window
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
