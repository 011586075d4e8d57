"""The dense model's components against plain-math references and hand-computed cases."""

import math

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.model import RMSNorm, RotaryEmbedding, apply_rotary, causal_window_mask, eager_attention
from custom_llm.model.attention import FOLD_MAX_QUERIES, sdpa_attention


def tiny(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_dim=64)
    return ModelConfig(**{**base, **kw})


def test_window_convention_pinned():
    # W = 3: query 5 sees keys 3, 4, 5 (i - W < j <= i), nothing later, nothing earlier.
    pos = torch.arange(8)
    mask = causal_window_mask(pos, pos, 3)
    assert mask[5].tolist() == [False, False, False, True, True, True, False, False]
    assert mask[0].tolist() == [True] + [False] * 7
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    full = causal_window_mask(pos, pos, None)
    assert torch.equal(full, torch.tril(torch.ones(8, 8, dtype=torch.bool)))


def test_window_convention_in_the_model():
    # Changing token 0 must change the output at position W - 1 but not at position W.
    W = 4
    model = Transformer(tiny(n_layers=1, sliding_window=W)).eval()
    ids = torch.randint(0, 64, (1, 10))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert (a[0, W - 1] - b[0, W - 1]).abs().max() > 1e-6
    torch.testing.assert_close(a[0, W:], b[0, W:], atol=0, rtol=0)


def test_rmsnorm_hand_computed():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[3.0, 4.0]])
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(norm(x), torch.tensor([[3 / rms, 8 / rms]]))
    half = norm.to(torch.bfloat16)(x.to(torch.bfloat16))  # a bf16 model keeps bf16 activations
    assert half.dtype == torch.bfloat16


def test_rope_rotates_pairs_first_half_with_second_half():
    D = 4
    rope = RotaryEmbedding(D, theta=10000.0)
    cos, sin = rope(torch.tensor([1]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, D)
    out = apply_rotary(x, cos, sin).view(-1)
    a0, a1 = 1.0, 10000 ** (-2 / 4)  # angles of pair (0, 2) and pair (1, 3) at position 1
    expected = torch.tensor([
        1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1),
    ])
    torch.testing.assert_close(out, expected)


def test_rope_relative_property():
    # <rot(q, m), rot(k, n)> depends only on m - n.
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(m, n):
        cq, sq = rope(torch.tensor([m]))
        ck, sk = rope(torch.tensor([n]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(dot(7, 3), dot(14, 10), atol=1e-5, rtol=0)


def test_eager_attention_against_naive_loop():
    B, H, K, T, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    pos = torch.arange(T)
    out = eager_attention(q, k, v, causal_window_mask(pos, pos, 3))
    expected = torch.zeros_like(out)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for i in range(T):
                js = [j for j in range(T) if i - 3 < j <= i]
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] / math.sqrt(D) for j in js])
                weights = torch.softmax(scores, 0)
                expected[b, h, i] = sum(w * v[b, kv, j] for w, j in zip(weights, js))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1, 3, FOLD_MAX_QUERIES, FOLD_MAX_QUERIES + 1])
@pytest.mark.parametrize("per_row_mask", [False, True])
def test_sdpa_masked_gqa_few_queries_matches_eager(T, per_row_mask):
    """Decode-shaped masked calls (GQA groups folded into query time up to FOLD_MAX_QUERIES, K/V expanded
    beyond) give eager attention's output, with a (T, S) mask and with a per-row (B, 1, T, S) one."""
    torch.manual_seed(0)
    B, H, K, S, D = 2, 6, 2, 40, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    mask = causal_window_mask(torch.arange(S - T, S), torch.arange(S), 7)  # (T, S)
    if per_row_mask:
        mask = mask.expand(B, 1, T, S).clone()
        mask[1, :, :, -3:] = False  # row 1 may not see the last keys, row 0 may
        mask[1, :, :, 0] = True
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), eager_attention(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window,pattern", [(None, None), (5, None), (5, "SL")])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_backends_agree_forward_and_backward(window, pattern, n_kv_heads):
    """sdpa and flex against eager. (CPU flex has no backward in PyTorch: its CPU training uses the sdpa
    path, so here flex is compared in the forward under no_grad; tests/gpu covers flex backward.)"""
    ref_cfg = tiny(n_kv_heads=n_kv_heads, sliding_window=window, window_pattern=pattern, attn_backend="eager")
    ids = torch.randint(0, 64, (2, 20))
    ref = Transformer(ref_cfg)
    ref_loss = ref.compute_loss(ids[:, :-1], ids[:, 1:]).loss
    ref_loss.backward()
    for backend in ("sdpa", "flex"):
        model = Transformer(ModelConfig(**{**ref_cfg.to_dict(), "attn_backend": backend}))
        model.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=0)
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=0, msg=f"{backend} grad of {name}")


def test_window_pattern_resolves_per_layer():
    config = tiny(n_layers=5, sliding_window=4, window_pattern="SSL")
    assert Transformer(config).layer_windows == [4, 4, None, 4, 4]
    assert tiny(n_layers=3, sliding_window=4).layer_windows() == [4, 4, 4]


def test_rezero_fresh_blocks_are_identity():
    model = Transformer(tiny(rezero=True)).eval()
    x = torch.randn(2, 7, 32)
    cos, sin = model.rope(torch.arange(7))
    for block in model.layers:
        torch.testing.assert_close(block(x, cos, sin)[0], x, atol=0, rtol=0)
    # And the scales are trainable: they receive a gradient.
    ids = torch.randint(0, 64, (2, 8))
    model.train()
    model.compute_loss(ids[:, :-1], ids[:, 1:]).loss.backward()
    assert model.layers[0].attn_scale.grad is not None and model.layers[0].attn_scale.grad.abs() > 0


def test_layerdrop_skips_blocks_only_in_training_and_is_reproducible():
    config = tiny(n_layers=4, layerdrop=0.5, layerdrop_schedule="constant", layerdrop_seed=3)
    model = Transformer(config)
    ids = torch.randint(0, 64, (1, 8))
    model.eval()
    with torch.no_grad():
        eval_a, eval_b = model(ids), model(ids)
    torch.testing.assert_close(eval_a, eval_b, atol=0, rtol=0)  # eval: every block, deterministic

    model.train()
    seen = set()
    calls = []
    hooks = [block.register_forward_hook(lambda m, i, o, idx=idx: calls.append(idx)) for idx, block in enumerate(model.layers)]
    decisions = []
    for _ in range(20):
        calls.clear()
        with torch.no_grad():
            model(ids)
        decisions.append(tuple(calls))
        seen.add(len(calls))
    for h in hooks:
        h.remove()
    assert min(seen) < 4, "some blocks must be skipped at p=0.5"
    # The same seed replays the same decisions.
    twin = Transformer(config).train()
    replay = []
    for _ in range(20):
        calls.clear()
        hooks = [block.register_forward_hook(lambda m, i, o, idx=idx: calls.append(idx)) for idx, block in enumerate(twin.layers)]
        with torch.no_grad():
            twin(ids)
        replay.append(tuple(calls))
        for h in hooks:
            h.remove()
    assert replay == decisions


def test_layerdrop_never_skips_a_block_in_eval():
    # p = 0.9 on every block: in training nearly every forward skips some; in eval none may.
    model = Transformer(tiny(n_layers=4, layerdrop=0.9, layerdrop_schedule="constant", layerdrop_seed=3))
    ids = torch.randint(0, 64, (1, 8))
    calls = []
    hooks = [block.register_forward_hook(lambda m, i, o, idx=idx: calls.append(idx))
             for idx, block in enumerate(model.layers)]
    model.train()
    with torch.no_grad():
        model(ids)
    assert len(calls) < 4, "at p=0.9 the training forward must skip blocks (else this test proves nothing)"
    model.eval()
    for grad in (False, True):  # eval with and without autograd
        calls.clear()
        with torch.set_grad_enabled(grad):
            model(ids)
        assert calls == [0, 1, 2, 3]
    for h in hooks:
        h.remove()


def test_layerdrop_linear_schedule():
    assert tiny(n_layers=4, layerdrop=0.4).layerdrop_probs() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert tiny(n_layers=4, layerdrop=0.4, layerdrop_schedule="constant").layerdrop_probs() == [0.4] * 4


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 12))
    plain = Transformer(tiny(dropout=0.1))
    ckpt = Transformer(tiny(dropout=0.1, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    losses, block_calls = [], []
    for model in (plain, ckpt):
        calls = []
        # A pre-hook: the recomputation stops early (before the block returns), so a forward hook misses it.
        hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in model.layers]
        torch.manual_seed(1)  # same dropout masks
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).loss
        after_forward = len(calls)
        loss.backward()
        block_calls.append((after_forward, len(calls)))
        losses.append(loss)
        for h in hooks:
            h.remove()
    # Checkpointing really happens: each block's forward is recomputed once during backward.
    assert block_calls == [(2, 2), (2, 4)]
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)


def test_tied_embeddings_share_storage_and_param_counts():
    tied = Transformer(tiny())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = Transformer(tiny(tie_embeddings=False))
    counts_tied, counts_untied = tied.num_params(), untied.num_params()
    assert counts_untied["total"] - counts_tied["total"] == 64 * 32
    assert counts_tied["non_embedding"] == counts_untied["non_embedding"]
    manual = sum(p.numel() for n, p in untied.named_parameters() if n not in ("embed_tokens.weight", "lm_head.weight"))
    assert counts_untied["non_embedding"] == manual
    assert counts_tied["active"] == counts_tied["total"]


def test_init_weights_scheme():
    model = Transformer(tiny(n_layers=8, init_std=0.02, rezero=True))
    assert torch.all(model.norm.weight == 1)
    assert model.layers[0].attn_scale.item() == 0
    out_std = model.layers[0].self_attn.o_proj.weight.std().item()
    in_std = model.layers[0].self_attn.q_proj.weight.std().item()
    assert in_std == pytest.approx(0.02, rel=0.15)
    assert out_std == pytest.approx(0.02 / 4, rel=0.15)


def test_forward_contract_shapes_and_logits_to_keep():
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 64, (3, 9))
    logits = model(ids)
    assert logits.shape == (3, 9, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(model(ids, logits_to_keep=1), logits[:, -1:])
