"""MoE oracle: random-weight Hugging Face Mixtral and Qwen2-MoE copied into our Transformer (logits, aux loss)."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager",
              rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
OURS = dict(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, max_seq_len=64, norm_eps=1e-6,
            tie_embeddings=False, rope_theta=500.0)


def _randomize(hf_model):
    """Non-trivial norms and a decisive router, so that a weight we fail to copy shows in the logits."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "experts" in name or "shared_expert" in name:
                p.normal_(0.0, 0.2)


def copy_hf_moe_weights(hf_model, model):
    """HF 5.x Mixtral/Qwen2-MoE names -> ours: drop 'model.', rename the router 'mlp.gate' -> 'mlp.router'."""
    state = {}
    for key, value in hf_model.state_dict().items():
        key = key.removeprefix("model.").replace(".mlp.gate.weight", ".mlp.router.weight")
        state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing


def _mixtral_pair(n_layers=2, **ours):
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=48, num_hidden_layers=n_layers, num_local_experts=4, num_experts_per_tok=2,
        output_router_logits=True, **COMMON)).eval()
    _randomize(hf)
    model = Transformer(ModelConfig(**OURS, n_layers=n_layers, n_experts=4, moe_top_k=2, moe_ffn_dim=48,
                                    moe_renormalize=True, **ours)).eval()
    copy_hf_moe_weights(hf, model)
    return hf, model


@pytest.mark.parametrize("dispatch", ["eager", "sorted"])
def test_mixtral_logits_match(dispatch):
    hf, model = _mixtral_pair(moe_dispatch=dispatch)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixtral_aux_loss_matches_hf():
    """One MoE layer: HF's unweighted router aux loss equals ours (same convention, sum_i f_i = top_k).

    With several layers HF pools f and P over all layers before taking their product, while we sum the
    per-layer Switch losses (each layer balanced on its own); the two agree for a single layer.
    """
    hf, model = _mixtral_pair(n_layers=1)
    ids = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)  # HF shifts labels itself
        ours = model.compute_loss(ids, targets)
    assert out.aux_loss is not None
    torch.testing.assert_close(ours.aux_loss, out.aux_loss.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, out.aux_loss * hf.config.router_aux_loss_coef + ours.lm_loss,
                               atol=1e-5, rtol=0)


def test_qwen2_moe_logits_match_with_gated_shared_expert():
    """Qwen2-MoE: q/k/v bias, no top-k renormalisation, a sigmoid-gated shared expert, MoE on layers 1 and 3."""
    config = transformers.Qwen2MoeConfig(
        intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=40, num_hidden_layers=4,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=False, **COMMON)
    hf = transformers.Qwen2MoeForCausalLM(config).eval()
    _randomize(hf)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.1)
    model = Transformer(ModelConfig(**OURS, n_layers=4, ffn_dim=80, attn_bias=True, n_experts=4, moe_top_k=2,
                                    moe_ffn_dim=32, moe_renormalize=False, moe_first_dense=1, moe_every=2,
                                    n_shared_experts=1, shared_expert_ffn_dim=40, shared_expert_gate=True)).eval()
    assert model.layer_is_moe == [False, True, False, True]
    copy_hf_moe_weights(hf, model)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
