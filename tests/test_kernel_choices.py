"""Which kernels the model's fast paths reach, checked on the CPU where the mechanism is the same as on
CUDA: SDPA never gets a mask together with enable_gqa (its math fallback), flex block masks are built
outside compiled blocks (a bounded number of graphs over many lengths), MoE dispatch is chosen once."""

import pytest
import torch
import torch.nn.functional as F

from custom_llm import ModelConfig
from custom_llm.errors import ConfigError
from custom_llm.generation import generate
from custom_llm.model import Transformer

SMALL = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64)


def _recording_sdpa(monkeypatch) -> list[dict]:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"mask": attn_mask is not None, "gqa": kw.get("enable_gqa", False),
                      "same_heads": q.shape[1] == k.shape[1], "causal": is_causal})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_sdpa_with_a_mask_never_asks_for_gqa(monkeypatch):
    """A mask plus enable_gqa sends SDPA to its math kernel on CUDA (B x H x T x S scores): K/V are
    expanded instead. Unmasked causal attention keeps enable_gqa (K/V read in place, no copy)."""
    calls = _recording_sdpa(monkeypatch)
    windowed = Transformer(ModelConfig(**SMALL, sliding_window=8, window_pattern="SL"))
    ids = torch.randint(0, 64, (2, 16))
    windowed.compute_loss(ids, ids).loss.backward()  # training: windowed (masked) and full (causal) layers
    generate(windowed.eval(), [[1, 2, 3], [4, 5, 6, 7, 8]], 4)  # padded prefill and decode steps: masks
    assert any(c["mask"] for c in calls) and any(not c["mask"] for c in calls)
    for call in calls:
        assert not (call["mask"] and call["gqa"]), call
        assert call["mask"] or (call["causal"] and call["gqa"]), call
        assert not call["mask"] or call["same_heads"], call


def test_compiled_flex_builds_masks_outside_the_blocks():
    """Compiled blocks with flex attention over five lengths, two windows: the graphs stay bounded
    (one per window, then dynamic shapes), well under dynamo's recompile limit, where building the
    masks inside the blocks traced mask creation into every block's graphs."""
    from torch._dynamo.utils import counters

    model = Transformer(ModelConfig(**SMALL, sliding_window=8, window_pattern="SL", attn_backend="flex")).eval()
    model.compile_blocks(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for T in (16, 32):
            model(torch.randint(0, 64, (2, T)))
        after_two = counters["stats"]["unique_graphs"]
        for T in (24, 48, 16):
            model(torch.randint(0, 64, (2, T)))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == after_two <= 6


def test_flex_and_sdpa_agree_with_the_eager_reference():
    ids = torch.randint(0, 64, (2, 24))
    torch.manual_seed(0)
    reference = Transformer(ModelConfig(**SMALL, sliding_window=8, window_pattern="SL", attn_backend="eager")).eval()
    for backend in ("sdpa", "flex"):
        model = Transformer(ModelConfig(**SMALL, sliding_window=8, window_pattern="SL", attn_backend=backend)).eval()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=0, msg=backend)


def test_moe_dispatch_resolution():
    from custom_llm.model.moe import resolve_dispatch

    grouped = "grouped_mm" if hasattr(F, "grouped_mm") else "sorted"
    assert resolve_dispatch("auto", "cpu", torch.float32, False, False, True) == grouped
    assert resolve_dispatch("auto", "cpu", torch.float32, True, True, True) == "gathered"  # compiled decoding
    assert resolve_dispatch("auto", "cpu", torch.float32, True, False, True) == "sorted"  # compiled fp32 training
    assert resolve_dispatch("auto", "cpu", torch.bfloat16, False, False, False) == "sorted"  # unaligned widths
    assert resolve_dispatch("eager", "cuda", torch.bfloat16, True, True, True) == "eager"  # asked for: kept


def test_grouped_mm_with_unaligned_widths_is_refused_up_front():
    with pytest.raises(ConfigError, match="moe_dispatch 'grouped_mm' needs d_model and moe_ffn_dim"):
        ModelConfig(**{**SMALL, "d_model": 36, "n_heads": 6, "n_kv_heads": 2}, n_experts=4, moe_ffn_dim=30,
                    moe_dispatch="grouped_mm")
    ModelConfig(**SMALL, n_experts=4, moe_ffn_dim=30, moe_dispatch="auto")  # auto takes another path instead


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 4])
def test_packed_documents_score_as_if_alone(backend, window):
    """Two documents packed in one row (document_ids) get the logits and loss each gets alone: attention
    never crosses the boundary, for every kernel, with and without a sliding window."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, sliding_window=window, attn_backend=backend)).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed = torch.cat([a, b], dim=1)  # (1, 16)
    docs = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        hidden = model._trunk(packed, document_ids=docs)[0]
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
        torch.testing.assert_close(hidden, alone, atol=1e-5, rtol=0)
        targets = torch.cat([a[:, 1:], torch.full((1, 1), -100), b[:, 1:], torch.full((1, 1), -100)], dim=1)
        loss = model.compute_loss(packed, targets, document_ids=docs).lm_loss
        per_doc = [model.compute_loss(x[:, :-1], x[:, 1:]).lm_loss for x in (a, b)]
        torch.testing.assert_close(loss, (6 * per_doc[0] + 8 * per_doc[1]) / 14, atol=1e-5, rtol=0)
        assert (model._trunk(packed)[0] - alone).abs().max() > 1e-3  # without the ids the second one sees the first


def test_cpu_autocast_runs_attention_in_fp32(monkeypatch):
    """Under CPU bf16 autocast the projections run in bf16 but SDPA gets fp32 q/k/v (its bf16 CPU backward
    is the slow one), and the loss and gradients stay close to fp32 training's."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *args, **kw)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    ids = torch.randint(0, 64, (2, 17))
    ref = model.compute_loss(ids[:, :-1], ids[:, 1:]).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).loss
        assert model.layers[0].self_attn.q_proj(torch.randn(1, 32)).dtype == torch.bfloat16  # the matmuls: bf16
    loss.backward()
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
    torch.testing.assert_close(loss.float(), ref, atol=0.02, rtol=0)
    for g, g_ref in zip((p.grad for p in model.parameters()), ref_grads):
        assert (g - g_ref).norm() <= 0.05 * g_ref.norm() + 1e-6


def test_auto_precision_on_the_cpu_follows_amx(monkeypatch):
    """precision auto: bf16 on a CPU with AMX, fp32 on one without; an explicit choice is kept."""
    from custom_llm.training import distributed

    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: True)
    assert distributed.resolve_precision("auto", cpu) == "bf16"
    assert distributed.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: False)
    assert distributed.resolve_precision("auto", cpu) == "fp32"
    assert distributed.resolve_precision("bf16", cpu) == "bf16"
