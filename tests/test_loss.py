"""The fused, chunked LM loss against plain cross-entropy over full logits."""

import pytest
import torch
import torch.nn.functional as F

from custom_llm import ModelConfig, Transformer
from custom_llm.model.loss import fused_lm_loss, reference_lm_loss


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_value_and_gradients_match_plain_cross_entropy(chunk_rows):
    N, C, V = 50, 16, 37
    hidden = torch.randn(N, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[3, 10, 11]] = -100  # ignored rows
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)  # independent of our code
    g_ref = torch.autograd.grad(ref * 3.0, (hidden, weight))
    got = fused_lm_loss(hidden, weight, targets, chunk_rows=chunk_rows)
    g_got = torch.autograd.grad(got * 3.0, (hidden, weight))  # a non-unit upstream gradient
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_got[0], g_ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(g_got[1], g_ref[1], atol=1e-5, rtol=0)


def test_no_grad_path_and_all_ignored():
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    targets = torch.tensor([1, -100, 4, 0])
    with torch.no_grad():
        torch.testing.assert_close(fused_lm_loss(hidden, weight, targets), reference_lm_loss(hidden, weight, targets))
    assert fused_lm_loss(hidden, weight, torch.full((4,), -100)).item() == 0.0


def test_model_loss_fused_equals_reference_with_tied_weights():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    model = Transformer(config)
    ids = torch.randint(0, 64, (3, 13))
    losses, grads = [], []
    for fused in (True, False):
        model.zero_grad()
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:], fused=fused).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    logits = model(ids[:, :-1])
    torch.testing.assert_close(losses[0], F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1)), atol=1e-5, rtol=0)


def test_bf16_autocast_close_to_fp32():
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_lm_loss(hidden, weight, targets, chunk_rows=16)
    got.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(got, reference_lm_loss(hidden, weight, targets), atol=0.1, rtol=0.02)


def test_fused_loss_does_no_gradient_work_without_grad():
    """Under torch.no_grad (evaluation) only the logits matmul runs; with grad the forward also
    computes the gradients (more matmuls of the same size), and the values agree."""
    from torch.utils.flop_counter import FlopCounterMode

    from custom_llm.model.loss import fused_lm_loss

    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (64,))
    one_matmul = 2 * 64 * 40 * 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        without = fused_lm_loss(hidden, weight, targets)
    assert counter.get_total_flops() == one_matmul
    with FlopCounterMode(display=False) as counter:
        with_grad = fused_lm_loss(hidden, weight, targets)
    assert counter.get_total_flops() >= 2 * one_matmul  # grad @ W (the in-place addmm_ may go uncounted)
    torch.testing.assert_close(without, with_grad.detach())
