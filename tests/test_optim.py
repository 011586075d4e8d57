"""Optimizers: Lion against its update rule on a hand-computed case; decay-aware parameter groups."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.training.optim import Lion, build_optimizer, param_groups


def test_lion_matches_hand_computed_update():
    # Chen et al. 2023, Algorithm 2, with lr=0.1, beta1=0.9, beta2=0.99, weight decay 0.5.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, 0.2, -4.0])
    opt.step()
    # m0 = 0: c = 0.1 * g -> sign(g) = [1, 1, -1]; theta = theta - 0.1 * (sign + 0.5 * theta)
    expected1 = torch.tensor([1.0 - 0.1 * (1 + 0.5), -2.0 - 0.1 * (1 - 1.0), 0.5 - 0.1 * (-1 + 0.25)])
    torch.testing.assert_close(p.detach(), expected1)
    # m1 = 0.01 * g1 = [0.003, 0.002, -0.04]
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, 0.002, -0.04]))
    p.grad = torch.tensor([-0.01, 0.5, 0.1])
    opt.step()
    # c = 0.9 * m1 + 0.1 * g2 = [0.0017, 0.0518, -0.026] -> sign = [1, 1, -1]
    theta1 = expected1
    expected2 = theta1 - 0.1 * (torch.tensor([1.0, 1.0, -1.0]) + 0.5 * theta1)
    torch.testing.assert_close(p.detach(), expected2)
    # m2 = 0.99 * m1 + 0.01 * g2
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, 0.002, -0.04]) * 0.99
                               + 0.01 * torch.tensor([-0.01, 0.5, 0.1]))


def test_lion_sign_flip_uses_interpolation_not_momentum():
    # With beta1 = 0.9 a gradient that flips sign still steps along the old momentum's sign only if
    # 0.9 * m outweighs 0.1 * g: here m = 1 (from beta2 = 0 bookkeeping), g = -5 -> c = 0.4 > 0.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = Lion([p], lr=1.0, betas=(0.9, 0.0))
    p.grad = torch.ones(1)
    opt.step()  # m = g = 1 (beta2 = 0)
    p.grad = torch.full((1,), -5.0)
    opt.step()
    assert p.item() == pytest.approx(-2.0)  # two steps of -lr * sign(+)


def test_param_groups_exclude_norms_biases_rezero_and_embeddings():
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    attn_bias=True, rezero=True))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "layers.0.self_attn.q_proj.weight" in decayed and "layers.1.mlp.down_proj.weight" in decayed
    assert {"embed_tokens.weight", "norm.weight", "layers.0.attn_scale", "layers.1.mlp_scale",
            "layers.0.self_attn.q_proj.bias", "layers.0.input_layernorm.weight"} <= kept
    assert not decayed & kept
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once
    decay_e, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "embed_tokens.weight" in {names[id(p)] for p in decay_e["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_build_optimizer_kinds():
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2))
    adamw = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[1]["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, "lion", 1e-4, 1.0, (0.9, 0.99)), Lion)


def test_adamw_takes_the_fused_cpu_kernel_and_matches_the_plain_update():
    # build_optimizer picks torch's fused AdamW where it exists (CPU: torch >= 2.4); its steps must be
    # the single-tensor reference loop's steps, weight decay and both parameter groups included.
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
    fast_model, plain_model = Transformer(config), Transformer(config)
    plain_model.load_state_dict(fast_model.state_dict())
    fast = build_optimizer(fast_model, "adamw", 1e-2, 0.1, (0.9, 0.95))
    plain = torch.optim.AdamW(param_groups(plain_model, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fast.defaults["fused"]
    ids = torch.randint(0, 64, (2, 9))
    for _ in range(3):
        for model, opt in ((fast_model, fast), (plain_model, plain)):
            model.compute_loss(ids[:, :-1], ids[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(fast_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
