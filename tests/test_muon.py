"""Muon: the Newton-Schulz band, one step against a hand-written reference, parameter groups,
optimizer.safetensors round trip, and the orthogonalisation shared by 2 gloo ranks."""

import os
import subprocess
import sys

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.training.muon import NS_COEFFICIENTS, Muon, assign_owners, newton_schulz
from custom_llm.training.optim import build_optimizer, muon_matrices

DENSE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
MOE = dict(DENSE, n_experts=4, moe_top_k=2, moe_ffn_dim=24, n_shared_experts=1, shared_expert_gate=True,
           moe_noisy_gating=True)


def _with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, generator: torch.Generator):
    """A (rows, cols) matrix P·diag(s)·Qᵀ with random orthonormal P, Q; returns (matrix, P, Q)."""
    k = min(rows, cols)
    P, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    Q, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    return P @ torch.diag(singular_values) @ Q.T, P, Q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(48, 48), (32, 96), (96, 32), (8, 200)])
def test_newton_schulz_singular_values_in_the_published_band(rows, cols, dtype):
    # Jordan et al. 2024: five quintic iterations map U·S·Vᵀ to U·S'·Vᵀ with S' in about [0.5, 1.5]
    # for every singular value that is not tiny after the Frobenius scaling (here >= 2e-3 of it).
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    k = min(rows, cols)
    spectrum = torch.logspace(-3, 0, k) * torch.rand(k, generator=g).add(0.5)  # spread over 3 decades
    spectrum = spectrum.clamp(min=2.5e-3 * float(torch.linalg.vector_norm(spectrum)))
    G, P, Q = _with_spectrum(rows, cols, spectrum[torch.randperm(k, generator=g)], g)
    G = G / torch.linalg.matrix_norm(G) * 7.0  # the scale of the input does not matter
    assert (torch.linalg.svdvals(G) / torch.linalg.matrix_norm(G)).min() > 2e-3
    O = newton_schulz(G, dtype=dtype)
    assert O.dtype == dtype and O.shape == G.shape
    s = torch.linalg.svdvals(O.float())
    assert 0.5 <= s.min() and s.max() <= 1.5, (s.min(), s.max())
    # the singular vectors are kept: Pᵀ·O·Q is (nearly) diagonal
    core = P.T @ O.float() @ Q
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-3)


def test_newton_schulz_gaussian_batch_and_tiny_singular_values():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 24, 80, generator=g)  # a batch of well-conditioned Gaussian matrices
    s = torch.linalg.svdvals(newton_schulz(stack))
    assert s.shape == (5, 24) and 0.5 <= s.min() and s.max() <= 1.5
    for i in range(5):  # each matrix on its own gives the same result
        torch.testing.assert_close(newton_schulz(stack[i]), newton_schulz(stack)[i], atol=1e-5, rtol=1e-5)
    # a direction far below the band's threshold stays small (the iteration does not invent directions)
    G, _, _ = _with_spectrum(16, 16, torch.cat([torch.ones(15), torch.tensor([1e-6])]), g)
    assert torch.linalg.svdvals(newton_schulz(G)).min() < 1e-3


def _reference_newton_schulz(M: torch.Tensor) -> torch.Tensor:
    """Plain per-matrix quintic iteration, written out (fp32)."""
    a, b, c = NS_COEFFICIENTS
    X = M.T if M.shape[0] > M.shape[1] else M
    X = X / (X.norm() + 1e-7)  # a zero gradient (ReZero blocks at step 0) stays zero
    for _ in range(5):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if M.shape[0] > M.shape[1] else X


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 13), generator=g)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("fields", [DENSE, MOE], ids=["dense", "moe"])
def test_muon_steps_match_a_hand_written_reference(fields):
    torch.manual_seed(0)
    config = ModelConfig(**fields, rezero=True, attn_bias=True)
    model, ref_model = Transformer(config), Transformer(config)
    ref_model.load_state_dict(model.state_dict())
    lr, muon_lr, mu, wd, muon_wd, betas = 3e-3, 0.05, 0.9, 0.1, 0.2, (0.9, 0.95)
    opt = build_optimizer(model, "muon", lr, wd, betas, muon_lr=muon_lr, muon_momentum=mu, muon_weight_decay=muon_wd)
    opt.ns_dtype = torch.float32  # the reference runs in fp32
    names = dict((id(p), n) for n, p in ref_model.named_parameters())
    matrix_names = {n for n, p in model.named_parameters() if any(p is m for m in muon_matrices(model))}
    ref_params = dict(ref_model.named_parameters())
    adam_decay = [p for n, p in ref_params.items() if n not in matrix_names and p.ndim >= 2 and "embed" not in n]
    adam_rest = [p for n, p in ref_params.items() if n not in matrix_names and (p.ndim < 2 or "embed" in n)]
    ref_adam = torch.optim.AdamW([{"params": adam_decay, "weight_decay": wd}, {"params": adam_rest, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, foreach=False)
    buffers = {}
    for step in range(3):
        x, y = _batch(step)
        for m in (model, ref_model):
            m.zero_grad()
            torch.manual_seed(100 + step)  # the same gating noise in both models
            m.compute_loss(x, y).loss.backward()
        opt.step()
        ref_adam.step()
        with torch.no_grad():  # Muon, by hand: Nesterov momentum, NS5, shape factor, decoupled decay
            for name in matrix_names:
                p = ref_params[name]
                buf = buffers.setdefault(name, torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad, alpha=1 - mu)
                nesterov = (1 - mu) * p.grad + mu * buf
                ortho = torch.stack([_reference_newton_schulz(m) for m in nesterov.reshape(-1, *p.shape[-2:])])
                scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                p.mul_(1 - muon_lr * muon_wd).sub_(muon_lr * scale * ortho.reshape(p.shape))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert len(names) == len(ref_params)


@pytest.mark.parametrize("fields", [dict(DENSE, tie_embeddings=False, attn_bias=True, rezero=True), MOE],
                         ids=["dense-untied", "moe"])
def test_muon_param_groups_cover_every_parameter_once(fields):
    model = Transformer(ModelConfig(**fields))
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95))
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len({id(p) for p in model.parameters()})
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "layers.0.self_attn.q_proj.weight" in muon and "layers.1.self_attn.o_proj.weight" in muon
    assert "embed_tokens.weight" in adam and "norm.weight" in adam
    assert all(n.startswith("layers.") and not n.endswith("bias") for n in muon)
    if "n_experts" in fields:
        assert {"layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj",
                "layers.0.mlp.shared_expert.up_proj.weight"} <= muon
        assert {"layers.0.mlp.router.weight", "layers.0.mlp.noise.weight", "layers.0.mlp.shared_expert_gate.weight"} <= adam
    else:
        assert {"lm_head.weight", "layers.0.attn_scale", "layers.0.self_attn.q_proj.bias"} <= adam
        assert "layers.0.mlp.down_proj.weight" in muon
    for group in opt.param_groups:  # each group's own peak lr for the schedule
        assert group["base_lr"] == (0.02 if group["muon"] else 1e-3)


def test_muon_refuses_vectors_and_balances_owners():
    with pytest.raises(ValueError, match="matrices or"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    params = [torch.zeros(64, 64), torch.zeros(64, 64), torch.zeros(4, 32, 64), torch.zeros(8, 8)]
    owners = assign_owners(params, 2)
    assert sorted(set(owners)) == [0, 1] and assign_owners(params, 1) == [0, 0, 0, 0]


def test_muon_state_round_trips_through_optimizer_safetensors(tmp_path):
    # Exact resume: 2 steps, save (optimizer.safetensors), 2 more steps; a fresh model and optimizer
    # loaded from the checkpoint take the same 2 steps to the same weights, bit for bit.
    from custom_llm.training.checkpoint import load_optimizer, load_weights, save_checkpoint

    config = ModelConfig(**MOE)

    def fresh():
        torch.manual_seed(0)
        model = Transformer(config)
        return model, build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), muon_weight_decay=0.1)

    def steps(model, opt, seeds):
        for seed in seeds:
            opt.zero_grad()
            torch.manual_seed(seed)  # gating noise
            model.compute_loss(*_batch(seed)).loss.backward()
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * (0.5 + 0.1 * seed)
            opt.step()

    model, opt = fresh()
    steps(model, opt, [0, 1])
    ckpt = save_checkpoint(tmp_path, 2, model, opt, {}, {"step": 2}, {"format": "custom-llm", "model": config.to_dict()})
    steps(model, opt, [2, 3])
    resumed, resumed_opt = fresh()
    load_weights(ckpt, resumed)
    load_optimizer(ckpt, resumed_opt)
    kinds = {k for s in resumed_opt.state.values() for k in s}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= kinds
    steps(resumed, resumed_opt, [2, 3])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


JOB = '''
import sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from custom_llm import ModelConfig, Transformer
from custom_llm.training import muon as muon_module
from custom_llm.training.optim import build_optimizer


def three_steps(fields):
    """Three Muon steps on fixed gradients (the same in every process, as DDP hands them over)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields))
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), muon_weight_decay=0.1)
    done = []  # sizes of the stacks this process orthogonalised
    real = muon_module.newton_schulz
    muon_module.newton_schulz = lambda G, *a, **k: done.append(G.shape[0]) or real(G, *a, **k)
    try:
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        muon_module.newton_schulz = real
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["orthogonalised"] = torch.tensor([sum(done) // 3])
    return tensors


if __name__ == "__main__":
    dist.init_process_group("gloo")
    save_file(three_steps(MOE), f"{sys.argv[1]}-rank{dist.get_rank()}.safetensors")
'''


def test_two_gloo_ranks_share_the_orthogonalisation_and_match_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(f"MOE = {MOE!r}\n" + JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "ddp")], check=True, timeout=400, env=env)
    namespace: dict = {}
    exec(compile(JOB, str(script), "exec"), namespace)  # the same job, in this one process
    single = namespace["three_steps"](MOE)
    ranks = [load_file(str(tmp_path / f"ddp-rank{r}.safetensors")) for r in (0, 1)]
    total = int(single.pop("orthogonalised"))
    shares = [int(r.pop("orthogonalised")) for r in ranks]
    # per layer: 4 attention matrices, 3 of the shared expert, 2 stacks of 4 experts; each rank did a part
    assert total == 2 * (4 + 3 + 2 * 4) and sum(shares) == total and min(shares) > 0
    for rank in ranks:
        for name, value in single.items():
            torch.testing.assert_close(rank[name], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_trainer_with_muon_resumes_exactly(tmp_path):
    # The training loop with train.optimizer muon: 2 steps, then resumed to 4, equals 4 straight steps
    # (weights bit for bit); the constant schedule makes the first run's lr independent of max_steps.
    import dataclasses
    import types

    import numpy as np
    from safetensors.torch import load_file

    from custom_llm.training import TrainConfig, train

    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.roll(rng.integers(0, 64, size=29), i) for i in range(80)]).astype(np.uint16)
    data = types.SimpleNamespace(train=tokens[:2000], val=tokens[2000:])
    model = ModelConfig(**DENSE)
    run = TrainConfig(optimizer="muon", max_steps=4, batch_size=4, schedule="constant", warmup_steps=1, lr=3e-3,
                      muon_lr=0.03, muon_weight_decay=0.1, eval_every=0, log_every=1, save_every=2, device="cpu",
                      precision="fp32", sample_tokens=0)
    train(model, run, tmp_path / "straight", data, progress=False)
    train(model, dataclasses.replace(run, max_steps=2), tmp_path / "resumed", data, progress=False)
    train(model, dataclasses.replace(run, seed=1), tmp_path / "resumed", data, resume=True, progress=False)  # a fresh start would differ
    straight, resumed = (load_file(str(tmp_path / d / "ckpt-4" / "model.safetensors")) for d in ("straight", "resumed"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
