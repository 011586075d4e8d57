"""Mixture of experts: dispatch paths against the eager reference, losses by hand, noisy gating, placement."""

import math

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.config import model_preset
from custom_llm.errors import ConfigError
from custom_llm.model.moe import MoE, _grouped_mm_function

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(**overrides):
    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, n_experts=6,
              moe_top_k=2, moe_ffn_dim=24, n_shared_experts=1, shared_expert_gate=True, moe_noisy_gating=True)
    return ModelConfig(**{**kw, **overrides})


def _fwd_bwd(layer, x, dispatch, seed=1):
    """Output, input gradient and parameter gradients of one forward/backward with a fixed noise seed."""
    layer.dispatch = dispatch
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, stats = layer(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + stats.aux_loss + stats.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


CPU_PATHS = ["sorted", "gathered"] + (["grouped_mm"] if _grouped_mm_function() is not None else [])


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dispatch", CPU_PATHS)
def test_dispatch_paths_match_eager_forward_and_backward(dispatch, training):
    layer = MoE(_config()).train(training)
    with torch.no_grad():
        layer.noise.weight.normal_(0, 0.1)
    x = torch.randn(3, 17, 32)
    ref_y, ref_dx, ref_grads = _fwd_bwd(layer, x, "eager")
    y, dx, grads = _fwd_bwd(layer, x, dispatch)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    names = {"router.weight", "experts.gate_up_proj", "experts.down_proj", "shared_expert_gate.weight"}
    assert names <= grads.keys()
    assert ("noise.weight" in grads) == training  # noise only in training
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)


def test_auto_dispatch_choice_on_cpu():
    layer = MoE(_config(moe_dispatch="auto"))  # 6 experts, top-2
    expected = "forward_grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "forward_sorted"
    assert layer._dispatch_path(torch.zeros(2, 32)).__name__ == expected  # eagerly, even for a few tokens
    seen = []

    def traced(x):
        seen.append(layer._dispatch_path(x).__name__)
        return x

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(traced, backend="eager")(torch.zeros(64, 32))  # compiled decoding sizes
        torch.compile(traced, backend="eager")(torch.zeros(65, 32))
    torch.compile(traced, backend="eager")(torch.zeros(8, 32))  # compiled training: never gathered
    torch._dynamo.reset()
    assert seen == ["forward_gathered", "forward_sorted", "forward_sorted"]  # compiled fp32 never takes grouped_mm
    layer.dispatch = "eager"
    assert layer._dispatch_path(torch.zeros(2, 32)).__name__ == "forward_eager"


def test_eager_reference_matches_naive_per_token_loop():
    """The eager path against a loop over tokens and their k choices, written from the definition."""
    layer = MoE(_config(n_shared_experts=0, shared_expert_gate=False, moe_noisy_gating=False,
                        moe_renormalize=False, moe_dispatch="eager")).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        y = layer(x)[0][0]
        probs = (x[0] @ layer.router.weight.T).softmax(-1)
        for t in range(9):
            top = probs[t].topk(2)
            expected = torch.zeros(32)
            for w, e in zip(top.values, top.indices):
                gate, up = (layer.experts.gate_up_proj[e] @ x[0, t]).chunk(2)
                expected += w * (layer.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
            torch.testing.assert_close(y[t], expected, atol=1e-6, rtol=0)


def test_loss_values_by_hand():
    """A uniform router: aux loss = K (HF convention: each of a token's K slots counts) and z = log(E)^2."""
    layer = MoE(_config(moe_noisy_gating=False)).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        stats = layer(torch.randn(2, 5, 32))[1]
    torch.testing.assert_close(stats.aux_loss, torch.tensor(2.0))
    torch.testing.assert_close(stats.z_loss, torch.tensor(math.log(6) ** 2))
    # A router that sends everything to expert 0 with probability ~1: f_0 = 1 (one of K=2 slots), P_0 = 1.
    with torch.no_grad():
        layer.router.weight.zero_()
        x = torch.randn(2, 5, 32).abs()
        layer.router.weight[0] = 100.0
        stats = layer(x)[1]
    torch.testing.assert_close(stats.aux_loss, torch.tensor(6.0 * 1.0), atol=1e-4, rtol=0)
    assert stats.expert_load[0] == 0.5 and stats.expert_load.sum() == 1.0


def test_expert_load_counts_routed_slots():
    layer = MoE(_config()).eval()
    x = torch.randn(2, 11, 32)
    load = layer(x)[1].expert_load
    with torch.no_grad():
        _, _, _, idx = layer.route(x.reshape(-1, 32))
    expected = torch.bincount(idx.flatten(), minlength=6).float() / idx.numel()
    torch.testing.assert_close(load, expected)
    assert not load.requires_grad


def test_noisy_gating_only_in_training_and_reproducible():
    layer = MoE(_config())
    with torch.no_grad():
        layer.noise.weight.normal_(0, 0.5)
    x = torch.randn(2, 16, 32)
    clean = MoE(_config(moe_noisy_gating=False))
    clean.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("noise")})
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x)[0], clean.eval()(x)[0])  # eval: no noise
        layer.train()
        torch.manual_seed(3)
        a = layer(x)[0]
        torch.manual_seed(3)
        b = layer(x)[0]
        c = layer(x)[0]
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4  # fresh noise changes the routing
    assert (a - clean.train()(x)[0]).abs().max() > 1e-4


def test_renormalize_switch():
    layer = MoE(_config(moe_noisy_gating=False)).eval()
    x = torch.randn(4, 32)
    _, probs, weights, _ = layer.route(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    layer.renormalize = False
    _, probs, weights, _ = layer.route(x)
    torch.testing.assert_close(weights, probs.topk(2).values)


@pytest.mark.parametrize("every,first,expected", [
    (1, 0, [True] * 4), (2, 0, [True, False, True, False]), (2, 1, [False, True, False, True]),
    (1, 3, [False, False, False, True]), (3, 0, [True, False, False, True])])
def test_layer_placement_patterns(every, first, expected):
    config = _config(n_layers=4, moe_every=every, moe_first_dense=first)
    assert config.layer_is_moe() == expected
    model = Transformer(config)
    assert [isinstance(b.mlp, MoE) for b in model.layers] == expected
    assert _config(n_experts=0).layer_is_moe() == [False, False]


def test_active_params_and_losses_reach_the_model():
    config = _config(n_layers=3, moe_every=2)
    model = Transformer(config).eval()  # eval: no router noise, so two forwards route alike
    counts = model.num_params()
    routed = sum(b.mlp.routed_expert_params() for b in model.layers if isinstance(b.mlp, MoE))
    assert routed == 2 * 6 * 3 * 24 * 32
    assert counts["total"] - counts["active"] == pytest.approx(routed * (1 - 2 / 6))
    ids = torch.randint(0, 64, (2, 12))
    out = model.compute_loss(ids, ids)
    x = model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(12))
    aux = z = 0
    for i, block in enumerate(model.layers):  # the blocks one by one, each MoE layer's own stats
        x, stats = block(x, cos, sin)
        assert (stats is not None) == isinstance(block.mlp, MoE)
        if stats is not None:
            aux, z = aux + stats.aux_loss, z + stats.z_loss
            torch.testing.assert_close(out.expert_load[i], stats.expert_load)
    assert sorted(out.expert_load) == [i for i, moe in enumerate(model.layer_is_moe) if moe]
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)


def test_init_weights_scales():
    model = Transformer(_config(n_layers=2, d_model=64, n_heads=4, moe_ffn_dim=128, init_std=0.05))
    layer = model.layers[0].mlp
    out_std = 0.05 / math.sqrt(4)
    assert abs(layer.experts.gate_up_proj.std().item() - 0.05) < 0.003
    assert abs(layer.experts.down_proj.std().item() - out_std) < 0.003
    assert abs(layer.shared_expert.down_proj.weight.std().item() - out_std) < 0.003
    assert layer.noise.weight.abs().max() == 0


def test_config_rules():
    with pytest.raises(ConfigError, match="moe_top_k"):
        _config(moe_top_k=7)
    with pytest.raises(ConfigError, match="shared_expert_gate"):
        _config(n_shared_experts=0, shared_expert_gate=True)


def test_moe_small_preset_learns():
    assert (model_preset("moe-small").n_experts, model_preset("moe-small").moe_top_k) == (8, 2)
    assert model_preset("moe-small").n_shared_experts == 1
    config = model_preset("moe-small", n_layers=1, vocab_size=128, d_model=64, n_heads=4,
                          moe_ffn_dim=64, max_seq_len=32)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 33))
    losses = []
    for _ in range(8):
        out = model.compute_loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.cuda
def test_grouped_mm_bf16_matches_eager_on_cuda():
    if _grouped_mm_function() is None:
        pytest.skip("this torch has no grouped_mm")
    layer = MoE(_config(d_model=64, moe_ffn_dim=64, moe_dispatch="auto")).cuda().train()
    x = torch.randn(4, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_y, ref_dx, ref_grads = _fwd_bwd(layer, x, "eager")
        y, dx, grads = _fwd_bwd(layer, x, "grouped_mm")
    torch.testing.assert_close(y.float(), ref_y.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx, ref_dx, atol=2e-2, rtol=2e-2)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=3e-2, rtol=3e-2, msg=name)


def test_compiled_fp32_model_takes_a_path_compile_supports():
    """torch.compile of an fp32 MoE model (CPU, or CUDA without autocast) traces and matches eager.

    torch 2.13's grouped_mm shape function accepts only bf16, so a compiled fp32 forward that
    picked grouped_mm failed while tracing; ``auto`` must choose the sorted path there.
    """
    model = Transformer(_config(moe_dispatch="auto", moe_noisy_gating=False))
    ids = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        loss = m.compute_loss(ids, targets).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref_loss, ref_grads = loss_and_grads(model)
    torch._dynamo.reset()
    model.compile_blocks(backend="eager")  # dynamo traces with shape functions (fake tensors)
    try:
        loss, grads = loss_and_grads(model)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=name)
