"""MFU's two halves: FLOPs per token against PyTorch's FLOP counter, and the per-device peak table.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of every matrix multiply that runs
(mm, addmm, bmm and the fused attention kernels; 2 per multiply-add) and nothing else, which is the
definition ``Transformer.flops_per_token`` follows. With the ``eager`` attention backend the score and
value products are plain batched matmuls over the whole T x T square (the causal mask is applied
after the multiply, as PaLM's convention counts it), so on a model without windows the counter and
the formula agree exactly: the tolerance is rounding only (rel 1e-9). For windowed layers the
formula counts W keys per query where dense kernels compute T; there the counter can confirm the
count only while T <= W, and the cap itself is checked by hand against the uncapped count.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from custom_llm import ModelConfig, Transformer
from custom_llm.training.distributed import H100_SXM_BF16_PEAK_FLOPS, device_peak_flops


def _model(**kw) -> Transformer:
    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
                attn_backend="eager", tie_embeddings=False)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **kw})).train()


def _counted_flops_per_token(model: Transformer, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step's forward and backward, per token, as the counter sees them."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    with FlopCounterMode(display=False) as counter:
        model.compute_loss(ids[:, :-1], ids[:, 1:], fused=False).loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("kw", [
    {},  # untied embedding: the head counts, the embedding lookup does not
    {"tie_embeddings": True},  # tied: the head is still a matmul
    {"head_dim": 12, "attn_bias": True},  # attention width n_heads * head_dim != d_model; biases are not matmuls
    {"sliding_window": 16, "window_pattern": "SL"},  # T <= W: the cap does not bite
])
def test_dense_flops_per_token_matches_flop_counter(kw):
    model = _model(**kw)
    torch.testing.assert_close(model.flops_per_token(16), _counted_flops_per_token(model, 2, 16), rtol=1e-9, atol=0)


def test_moe_counts_only_the_active_experts():
    # eager dispatch runs each expert on exactly its tokens, so the counter sees top_k of n_experts per token;
    # router, noise projection, shared expert and its gate are all matmuls a token passes through.
    model = _model(n_experts=4, moe_top_k=2, moe_ffn_dim=24, moe_dispatch="eager", moe_noisy_gating=True,
                   n_shared_experts=1, shared_expert_gate=True, moe_first_dense=1)
    torch.testing.assert_close(model.flops_per_token(16), _counted_flops_per_token(model, 2, 16), rtol=1e-9, atol=0)
    dense_twin = _model(n_experts=4, moe_top_k=4, moe_ffn_dim=24, moe_dispatch="eager", moe_noisy_gating=True,
                        n_shared_experts=1, shared_expert_gate=True, moe_first_dense=1)
    experts = model.layers[1].mlp.routed_expert_params()
    assert dense_twin.flops_per_token(16) - model.flops_per_token(16) == pytest.approx(6 * experts * (4 - 2) / 4)


def test_embedding_lookup_is_not_counted():
    model = _model()
    matmul_params = sum(p.numel() for name, p in model.named_parameters()
                        if p.dim() == 2 and name != "embed_tokens.weight")
    attention = 12 * 2 * 32 * 40
    assert model.flops_per_token(40) == 6 * matmul_params + attention


def test_attention_term_is_capped_at_each_layers_window():
    """Layers 'S' see at most W keys per query; 'L' layers all T. Checked by hand against the full count."""
    T, W, width = 48, 16, 4 * 8
    full = _model()
    windowed = _model(sliding_window=W, window_pattern="SL")  # layer 0 windowed, layer 1 full
    assert windowed.layer_windows == [W, None]
    assert full.flops_per_token(T) - windowed.flops_per_token(T) == 12 * width * (T - W)
    every = _model(sliding_window=W)
    assert full.flops_per_token(T) - every.flops_per_token(T) == 2 * 12 * width * (T - W)
    assert every.flops_per_token(W) == full.flops_per_token(W)  # at T <= W the window changes nothing
    # and the counter agrees with the formula as long as dense attention computes exactly the counted keys
    torch.testing.assert_close(every.flops_per_token(W), _counted_flops_per_token(every, 1, W), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "H100 NVL", 835),
    ("NVIDIA H200", "H200 SXM", 989),
    ("NVIDIA H200 NVL", "H200 NVL", 835),
    ("NVIDIA GH200 480GB", "GH200", 989),
    ("NVIDIA A100-SXM4-80GB", "A100", 312),
    ("NVIDIA A100-PCIE-40GB", "A100", 312),
    ("NVIDIA A100 80GB PCIe", "A100", 312),
    ("NVIDIA L4", "L4", 121),
    ("NVIDIA L40S", "L40S", 362),
    ("NVIDIA L40", "L40", 181),
    ("NVIDIA A10", "A10", 125),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 165),
    ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090", 71),
])
def test_peak_table_matches_exact_device_names(name, label, tflops):
    value, description = device_peak_flops(name)
    assert value is not None and round(value / 1e12) == tflops
    assert description.startswith(label + " ") and name in description


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D",
                                  "NVIDIA A10G", "Tesla T4", "NVIDIA L4X", "AMD Instinct MI300X"])
def test_unlisted_or_ambiguous_devices_have_no_peak(name):
    value, description = device_peak_flops(name)
    assert value is None and name in description


def test_bench_uses_the_same_peak_constant():
    from custom_llm.bench import core

    assert core.H100_SXM_BF16_PEAK_FLOPS is H100_SXM_BF16_PEAK_FLOPS
    assert device_peak_flops("NVIDIA H100 80GB HBM3")[0] == H100_SXM_BF16_PEAK_FLOPS
