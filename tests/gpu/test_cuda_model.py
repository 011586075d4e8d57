"""CUDA-only checks of the model's fast paths (skipped without an NVIDIA GPU)."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer

pytestmark = pytest.mark.cuda


def _config(**kw):
    base = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=256, ffn_dim=256)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_agree_with_eager_fp32_forward_and_backward(backend, window):
    ref = Transformer(_config(attn_backend="eager", sliding_window=window)).cuda()
    model = Transformer(_config(attn_backend=backend, sliding_window=window)).cuda()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 200), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    losses = []
    for m in (ref, model):
        loss = m.compute_loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bf16_autocast_close_to_fp32(backend):
    model = Transformer(_config(attn_backend=backend, sliding_window=64)).cuda().eval()
    ids = torch.randint(0, 256, (2, 256), device="cuda")
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(ids).float()
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)
