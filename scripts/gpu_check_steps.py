#!/usr/bin/env python3
"""The Python steps of scripts/gpu_check.sh, each runnable alone on CUDA or (smaller) on the CPU.

    gpu_check_steps.py toolchain [--device cuda|cpu]  torch.compile of a small function, and on CUDA a
                                                       hand-written Triton kernel compiled and launched
    gpu_check_steps.py train [--device ...]            the train_dense / train_moe bench cases (compiled):
                                                       tokens/s against HF, MFU, graphs and graph breaks
    gpu_check_steps.py moe [--device ...]              compiled MoE training against eager: graphs, graph
                                                       breaks, recompiles after the first step, losses
    gpu_check_steps.py decode [--device ...]           the ``decode`` bench case, then compiled decoding at
                                                       alternating batch sizes: recompiles, CUDA-graph skips

Compilation is counted with torch._dynamo's own counters (``torch._dynamo.utils.counters``): graphs
compiled (``stats.unique_graphs``), graph breaks (``graph_break``, by reason) and CUDA graphs inductor
declined to record (``inductor.cudagraph_skips``). Every step prints what it measured and ends with
one line ``SUMMARY PASS|FAIL <details>``, which gpu_check.sh collects; the exit code is 0 for PASS.
On the CPU the bench cases run at their ``--quick`` sizes (a smoke test of the path, not a measurement).
``--out DIR`` appends the bench JSON lines to DIR/bench.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import sysconfig
import time

import torch

from custom_llm import ModelConfig, Transformer


def counters() -> dict:
    """The compile counters that matter here, as plain numbers (a snapshot)."""
    from torch._dynamo.utils import counters as c

    return {"graphs": c["stats"]["unique_graphs"], "frames": c["frames"]["ok"],
            "graph_breaks": sum(c["graph_break"].values()), "cudagraph_skips": c["inductor"]["cudagraph_skips"]}


def since(before: dict) -> dict:
    """Counter increases since the snapshot ``before``."""
    return {k: v - before[k] for k, v in counters().items()}


def graph_break_reasons(limit: int = 3) -> list[str]:
    """The first lines of the first few graph-break reasons dynamo recorded."""
    from torch._dynamo.utils import counters as c

    return [reason.splitlines()[0][:160] for reason in list(c["graph_break"])[:limit]]


def summary(ok: bool, **details) -> int:
    """Print the step's one-line summary; the exit code."""
    text = " ".join(f"{k}={v}" for k, v in details.items())
    print(f"SUMMARY {'PASS' if ok else 'FAIL'} {text}", flush=True)
    return 0 if ok else 1


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- toolchain ------------------------------------------------------------------------------------

def toolchain(device: torch.device) -> int:
    """Can this machine generate and run kernels? inductor on a small function; Triton by hand on CUDA."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    print(f"C compiler: {compiler or 'none'} | Python.h: {'found' if headers else 'missing'}")

    def f(x, y):
        return torch.nn.functional.gelu(x @ y) * 2 + 1

    x, y = torch.randn(64, 64, device=device), torch.randn(64, 64, device=device)
    start = time.perf_counter()
    got = torch.compile(f)(x, y)
    sync(device)
    compile_s = time.perf_counter() - start
    torch.testing.assert_close(got, f(x, y), rtol=1e-3, atol=1e-3)
    print(f"torch.compile (inductor, {'Triton' if device.type == 'cuda' else 'C++'}): ok, first call {compile_s:.1f} s")
    details = {"inductor_first_call_s": round(compile_s, 1)}
    if device.type == "cuda":
        details["triton_first_launch_s"] = round(_triton_kernel(device), 1)
    return summary(True, **details)


def _triton_kernel(device: torch.device) -> float:
    """Compile and launch out = 2x + y in Triton (its first launch also builds a C launcher); seconds."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, 2 * tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
                 mask=mask)

    n = 1000
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    out = torch.empty_like(x)
    start = time.perf_counter()
    scale_add[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
    sync(device)
    seconds = time.perf_counter() - start
    torch.testing.assert_close(out, 2 * x + y)
    print(f"Triton {triton.__version__}: hand-written kernel compiled and launched, {seconds:.1f} s")
    return seconds


def _bench(cases: list[str], device: torch.device, compile: bool, out: str | None):
    """Run bench cases in this process (so the compile counters see them); the results, also appended to out."""
    from custom_llm.bench.runner import run_benchmarks

    results = []
    for result in run_benchmarks(cases, device.type, quick=device.type == "cpu", compile=compile):
        print(result.to_json(), flush=True)
        if out:
            with open(os.path.join(out, "bench.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(result.to_json() + "\n")
        results.append(result)
    return results


# --- training benchmark -----------------------------------------------------------------------------

def train(device: torch.device, compile: bool = True, out: str | None = None) -> int:
    """train_dense and train_moe (ours compiled per block against the HF twin). Pass: both ran and the
    first losses of ours and HF on the same batch agree (same weights), so the speed compares like with like."""
    torch._dynamo.reset()
    before = counters()
    details, ok = {}, True
    results = _bench(["train_dense", "train_moe"], device, compile, out)
    for result in results:
        config = result.config
        first = config.get("first_loss", {})
        if "ref" in first:
            ok &= abs(first["ours"] - first["ref"]) <= 1e-2 * abs(first["ref"])
        details[result.case] = f"{result.ours:.0f}tok/s"
        details[result.case + "_vs_hf"] = None if result.ratio is None else f"{result.ratio:.2f}x"
        if config.get("mfu") is not None:
            details[result.case + "_mfu"] = f"{config['mfu']:.3f}"
    compiled = since(before)
    peak = next((r.config["mfu_peak"] for r in results if r.config.get("mfu_peak")), None)
    print(f"compiled: {compiled['graphs']} graphs, {compiled['graph_breaks']} graph breaks; MFU peak: {peak}")
    for reason in graph_break_reasons():
        print("  graph break:", reason)
    return summary(ok, **details, graphs=compiled["graphs"], graph_breaks=compiled["graph_breaks"],
                   peak=json.dumps(peak) if peak else None)


# --- compiled MoE training --------------------------------------------------------------------------

MOE_SIZES = {
    "cuda": dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, n_experts=8, moe_top_k=2,
                 moe_ffn_dim=1024, max_seq_len=512, batch=8),
    "cpu": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, moe_top_k=2,
                moe_ffn_dim=64, max_seq_len=32, batch=2),
}


def moe(device: torch.device, steps: int = 5) -> int:
    """Train a small MoE model eagerly and with compiled blocks from the same weights on the same batches.

    CUDA runs under bf16 autocast, the CPU with bf16 weights: bf16 is where compiled code takes the
    grouped GEMM (``resolve_dispatch``). Pass: losses agree to bf16 precision and no step after the
    first compiles anything new (a new graph per routing pattern would soon hit dynamo's recompile
    limit and leave the rest of training eager).
    """
    from custom_llm.model.moe import grouped_mm_aligned, resolve_dispatch

    sizes = dict(MOE_SIZES[device.type])
    batch = sizes.pop("batch")
    seq_len = sizes["max_seq_len"]
    torch.manual_seed(0)
    eager = Transformer(ModelConfig(**sizes)).to(device)
    if device.type == "cpu":
        eager.to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    path = resolve_dispatch(eager.config.moe_dispatch, device.type, torch.bfloat16, True, False,
                            grouped_mm_aligned(sizes["d_model"], sizes["moe_ffn_dim"]))
    print(f"compiled training dispatch: {path} | torch {torch.__version__} | {device.type}")
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True) for m in (eager, compiled)}
    generator = torch.Generator().manual_seed(1)
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    step_s: dict[str, list[float]] = {"eager": [], "compiled": []}
    torch._dynamo.reset()
    start_counts = counters()
    after_first = None
    for step in range(steps):
        tokens = torch.randint(0, sizes["vocab_size"], (batch, seq_len + 1), generator=generator).to(device)
        for name, model in (("eager", eager), ("compiled", compiled)):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            optimizers[model].step()
            optimizers[model].zero_grad(set_to_none=True)
            sync(device)
            step_s[name].append(time.perf_counter() - start)
            losses[name].append(float(loss.detach()))
        if step == 0:
            after_first = counters()
    first = {k: after_first[k] - start_counts[k] for k in start_counts}
    later = since(after_first)
    diffs = [abs(c - e) / abs(e) for c, e in zip(losses["compiled"], losses["eager"])]
    print("losses eager:   ", " ".join(f"{v:.4f}" for v in losses["eager"]))
    print("losses compiled:", " ".join(f"{v:.4f}" for v in losses["compiled"]))
    print(f"first step: {first['graphs']} graphs, {first['graph_breaks']} graph breaks; "
          f"steps 2-{steps}: {later['graphs']} new graphs (recompiles)")
    for reason in graph_break_reasons():
        print("  graph break:", reason)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    ok = all(map(lambda v: v == v and abs(v) < float("inf"), losses["compiled"])) and max(diffs) < 3e-2 \
        and later["graphs"] == 0
    return summary(ok, dispatch=path, graphs=first["graphs"], graph_breaks=first["graph_breaks"],
                   recompiles=later["graphs"], max_loss_rel_diff=f"{max(diffs):.2e}",
                   step_ms_eager=round(1e3 * median(step_s["eager"][1:]), 1),
                   step_ms_compiled=round(1e3 * median(step_s["compiled"][1:]), 1))


# --- compiled decoding ----------------------------------------------------------------------------

def decode(device: torch.device, out: str | None = None) -> int:
    """The decode bench case (compiled), then compiled decoding at batch sizes 1, 2, 1, 2 after a warm-up
    at 1 and 2: nothing may recompile, and on CUDA no CUDA graph may be skipped."""
    from custom_llm.generation import Engine

    cpu = device.type == "cpu"
    torch._dynamo.reset()
    before = counters()
    start = time.perf_counter()
    result = _bench(["decode"], device, True, out)[0]
    bench = since(before)
    print(f"bench decode: {result.ours:.1f} tokens/s ours, "
          f"{'-' if result.ref is None else f'{result.ref:.1f}'} HF, {time.perf_counter() - start:.0f} s; "
          f"{bench['graphs']} graphs, {bench['cudagraph_skips']} CUDA-graph skips")

    config = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64) if cpu else \
        dict(vocab_size=8192, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**config)).to(device).eval()
    if not cpu:
        model.to(torch.bfloat16)
    engine = Engine(model, compile=True)
    prompts = {1: [[1, 2, 3, 4]], 2: [[1, 2, 3, 4], [5, 6, 7]]}
    for b in (1, 2):  # warm-up: one compilation (and CUDA graph) per batch bucket
        engine.generate(prompts[b], 8)
    warm = counters()
    outputs = [engine.generate(prompts[b], 8) for b in (1, 2, 1, 2)]
    alternating = since(warm)
    agree = outputs[0] == Engine(model, compile=False).generate(prompts[1], 8)
    print(f"alternating batch sizes 1,2,1,2 after warm-up: {alternating['graphs']} new graphs, "
          f"{alternating['cudagraph_skips']} CUDA-graph skips; greedy tokens equal to eager: {agree}")
    ok = alternating["graphs"] == 0 and alternating["cudagraph_skips"] == 0 and bench["cudagraph_skips"] == 0
    return summary(ok, tokens_per_s=round(result.ours, 1),
                   vs_hf=None if result.ratio is None else round(result.ratio, 2),
                   bench_graphs=bench["graphs"], cudagraph_skips=bench["cudagraph_skips"] + alternating["cudagraph_skips"],
                   recompiles_alternating=alternating["graphs"], greedy_equal_eager=agree)


def main(argv: list[str]) -> int:
    """Run one step; its exit code (0: PASS)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("toolchain", "train", "moe", "decode"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="train: benchmark eagerly")
    parser.add_argument("--out", default=None, help="append bench JSON lines to OUT/bench.jsonl")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps = {"toolchain": lambda: toolchain(device), "train": lambda: train(device, args.compile, args.out),
             "moe": lambda: moe(device), "decode": lambda: decode(device, args.out)}
    try:
        return steps[args.step]()
    except Exception as error:  # noqa: BLE001 - the summary line must say what broke
        import traceback

        traceback.print_exc()
        return summary(False, error=json.dumps(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
