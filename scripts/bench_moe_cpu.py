"""Side-by-side train-step throughput: our MoE Transformer vs Hugging Face Mixtral (same config, one process).

Usage: python scripts/bench_moe_cpu.py [--steps 5] [--dispatch sorted] [--hf-experts grouped_mm|eager]
"""

import argparse
import time

import torch
import transformers

from custom_llm import ModelConfig, Transformer


def train_step(model, loss_fn, ids, opt):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    opt.step()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--hf-experts", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, L, V, E, F = 384, 6, 8192, 8, 512
    ours = Transformer(ModelConfig(vocab_size=V, d_model=d, n_layers=L, n_heads=6, n_kv_heads=2, max_seq_len=a.seq,
                                   tie_embeddings=False, n_experts=E, moe_top_k=2, moe_ffn_dim=F,
                                   moe_dispatch=a.dispatch)).train()
    hf_cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=d, intermediate_size=F, num_hidden_layers=L,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=a.seq,
                                        num_local_experts=E, num_experts_per_tok=2, output_router_logits=True,
                                        attn_implementation="sdpa")
    if a.hf_experts:
        hf_cfg._experts_implementation = a.hf_experts
    hf = transformers.MixtralForCausalLM(hf_cfg).train()
    print("hf experts implementation:", hf.config._experts_implementation)
    ids = torch.randint(0, V, (a.batch, a.seq + 1))
    runs = {
        "ours": (ours, lambda m, x: m.compute_loss(x[:, :-1], x[:, 1:]).loss),
        "hf": (hf, lambda m, x: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss),
    }
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in runs.items()}
    times = {name: [] for name in runs}
    for step in range(a.steps + 1):  # alternate the two models so that machine load hits both alike
        for name, (model, fn) in runs.items():
            t = train_step(model, fn, ids, opts[name])
            if step > 0:
                times[name].append(t)
    results = {}
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        results[name] = a.batch * (a.seq - 1) / t
        print(f"{name}: {t * 1000:.0f} ms/step (median of {len(ts)}), {results[name]:.0f} tokens/s; all: "
              + " ".join(f"{x:.2f}" for x in ts))
    print(f"ratio ours/hf: {results['ours'] / results['hf']:.2f}x")


if __name__ == "__main__":
    main()
