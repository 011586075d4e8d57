"""Side-by-side train-step throughput: our MoE Transformer vs Hugging Face Mixtral (same config, one process).

Usage: python scripts/bench_moe_cpu.py [--steps 5] [--dispatch sorted] [--hf-experts grouped_mm|eager]
                                       [--cpu-time] [--profile]

On a shared machine, wall-clock times with two threads swing by 2x from step to step (every parallel
region waits for a descheduled thread). ``--cpu-time`` runs on one thread and times each step by that
thread's CPU time, which other processes disturb far less; use it to compare code changes, and the
wall-clock default (what ``custom-llm bench`` measures) to confirm. ``--profile`` prints, for one
step of each model, how its time splits between matrix multiplies, attention, the optimizer and the rest
(torch.profiler durations, which are wall-clock: a loaded machine stretches them all).
"""

import argparse
import time

import torch
import transformers

from custom_llm import ModelConfig, Transformer

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def train_step(model, loss_fn, ids, opt, clock):
    t0 = clock()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    opt.step()
    return clock() - t0


def profile_split(step) -> str:
    """One profiled step: self time of GEMMs, of attention (SDPA), inside optimizer.step, and the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    sdpa = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    optim = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    parts = {"GEMM": gemm, "SDPA": sdpa, "optimizer": optim, "rest": total - gemm - sdpa - optim}
    top = sorted((e for e in events if e.key not in GEMM_OPS), key=lambda e: -e.self_cpu_time_total)[:6]
    return (f"{total / 1e3:.0f} ms profiled (wall): " + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items())
            + "\n    top other ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in top))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--hf-experts", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    p.add_argument("--profile", action="store_true", help="print each model's time split for one step")
    a = p.parse_args()
    torch.set_num_threads(1 if a.cpu_time else a.threads)
    clock = time.thread_time if a.cpu_time else time.perf_counter
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
    print("hf experts implementation:", hf.config._experts_implementation,
          "| clock:", "thread CPU time, 1 thread" if a.cpu_time else f"wall, {torch.get_num_threads()} threads")
    ids = torch.randint(0, V, (a.batch, a.seq + 1))
    runs = {
        "ours": (ours, lambda m, x: m.compute_loss(x[:, :-1], x[:, 1:]).loss),
        "hf": (hf, lambda m, x: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss),
    }
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in runs.items()}
    times = {name: [] for name in runs}
    for step in range(a.steps + 1):  # alternate the two models so that machine load hits both alike
        for name, (model, fn) in runs.items():
            t = train_step(model, fn, ids, opts[name], clock)
            if step > 0:
                times[name].append(t)
    results = {}
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        results[name] = a.batch * (a.seq - 1) / t
        print(f"{name}: {t * 1000:.0f} ms/step (median of {len(ts)}), {results[name]:.0f} tokens/s; all: "
              + " ".join(f"{x:.2f}" for x in ts))
    paired = sorted(h / o for o, h in zip(times["ours"], times["hf"]))
    print(f"ratio ours/hf: {results['ours'] / results['hf']:.2f}x (paired per round: {paired[len(paired) // 2]:.2f}x)")
    if a.profile:
        for name, (model, fn) in runs.items():
            print(f"{name}: " + profile_split(lambda: train_step(model, fn, ids, opts[name], clock)))


if __name__ == "__main__":
    main()
