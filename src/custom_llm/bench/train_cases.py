"""Training cases: tokens/s of full steps against Hugging Face, and the price of gradient checkpointing.

``train_dense`` and ``train_moe`` time one full step (forward, backward, AdamW) of our model and of
its Hugging Face twin (``LlamaForCausalLM`` / ``MixtralForCausalLM`` with the same weights), on the same
batch, alternately. On CUDA both run under bf16 autocast; ours has its blocks compiled, the reference
runs eager (``--ref-compile`` compiles it too). MFU = tokens/s x FLOPs/token over the dense bf16 peak
of the GPU measured on (``device_peak_flops``; none for an unlisted card), FLOPs/token = matmul FLOPs
only (``Transformer.flops_per_token``: 6 x active weight-matrix parameters + the attention products).
"""

from __future__ import annotations

import torch

from .context import (Context, adamw, autocast, build_model, dtype_name, hf_loss, ours_loss,
                      random_batch, train_step)
from ..training.distributed import device_peak_flops
from .core import Result, median, mfu, paired_ratio, peak_memory_bytes, time_alternating
from .hf_reference import experts_implementation, hf_twin, transformers_version


def train_dense(ctx: Context) -> Result:
    """Dense model training throughput against HF Llama."""
    return _train_case("train_dense", ctx.sizes.dense, ctx)


def train_moe(ctx: Context) -> Result:
    """Mixture-of-experts training throughput against HF Mixtral."""
    return _train_case("train_moe", ctx.sizes.moe, ctx)


def _train_case(name: str, fields: dict, ctx: Context) -> Result:
    s, device = ctx.sizes, ctx.device
    model = build_model(fields, device, ctx.seed)
    hf = hf_twin(model)
    x, y = random_batch(model.config.vocab_size, s.batch, s.seq_len, device, ctx.seed)
    first_loss = _first_losses(model, hf, x, y, ctx)
    if ctx.compile:
        model.compile_blocks()
    optimizer = adamw(model, device)
    steps = {"ours": train_step(lambda: ours_loss(model, x, y), optimizer, device, s.autocast)}
    if hf is not None:
        if ctx.ref_compile:
            hf.compile()
        steps["ref"] = train_step(lambda: hf_loss(hf, x, y), adamw(hf, device), device, s.autocast)
    times = time_alternating(steps, device, s.repeats, s.warmup)
    tokens = s.batch * s.seq_len
    ours = tokens / median(times["ours"])
    ref = tokens / median(times["ref"]) if "ref" in times else None
    params = model.num_params()
    config = {"model": dict(fields), "params": params, "batch": s.batch, "seq_len": s.seq_len,
              "dtype": dtype_name(s.autocast) + (" autocast" if s.autocast else ""),
              "optimizer": "AdamW " + ("fused" if optimizer.defaults.get("fused") else "foreach") + " (both)",
              "ours_compile": "per-block torch.compile" if ctx.compile else "eager",
              "ref": _ref_description(hf, ctx), "warmup": s.warmup, "repeats": s.repeats,
              "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "first_loss": first_loss,
              "paired_ratio": paired_ratio(times), "higher_is_better": True}
    if device.type == "cuda":
        flops = model.flops_per_token(s.seq_len)
        peak, peak_note = device_peak_flops(torch.cuda.get_device_name(device))
        config.update(flops_per_token=flops, mfu=mfu(ours, flops, peak) if peak else None,
                      ref_mfu=mfu(ref, flops, peak) if ref and peak else None,
                      mfu_peak=peak_note, mfu_peak_flops=peak, gpu=torch.cuda.get_device_name(device))
    return Result(name, ours, ref, "tokens/s", device.type, config)


def _first_losses(model, hf, x, y, ctx: Context) -> dict:
    """Both losses on the benchmark batch before any step: equal weights must give equal losses."""
    with torch.no_grad(), autocast(ctx.device, ctx.sizes.autocast):
        out = {"ours": float(model.compute_loss(x, y).lm_loss)}
        if hf is not None:
            logits = hf(input_ids=x).logits.float()
            out["ref"] = float(torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1)))
    return out


def _ref_description(hf, ctx: Context):
    if hf is None:
        return None
    desc = {"class": type(hf).__name__, "transformers": transformers_version(),
            "attn_implementation": hf.config._attn_implementation, "compile": ctx.ref_compile}
    experts = experts_implementation(hf)
    if hasattr(hf.config, "num_local_experts"):
        desc["experts_implementation"] = experts
    return desc


def grad_ckpt_memory(ctx: Context) -> Result:
    """Peak training-step memory with gradient checkpointing (ours) over without (ref); step times in config."""
    s, device = ctx.sizes, ctx.device
    model = build_model(s.dense, device, ctx.seed)
    if ctx.compile:
        model.compile_blocks()
    x, y = random_batch(model.config.vocab_size, s.batch, s.seq_len, device, ctx.seed)
    step = train_step(lambda: ours_loss(model, x, y), adamw(model, device), device, s.autocast)

    def with_checkpointing(enabled: bool):
        def run() -> None:
            model.config.grad_checkpointing = enabled
            step()
        return run

    runs = {"ckpt": with_checkpointing(True), "plain": with_checkpointing(False)}
    times = time_alternating(runs, device, s.repeats, s.warmup)  # warm-up also creates the AdamW state
    peaks = {name: peak_memory_bytes(run, device) / 2**20 for name, run in runs.items()}
    model.config.grad_checkpointing = False
    t_ckpt, t_plain = median(times["ckpt"]), median(times["plain"])
    config = {"model": dict(s.dense), "batch": s.batch, "seq_len": s.seq_len, "dtype": dtype_name(s.autocast),
              "ours": "peak with grad_checkpointing", "ref": "peak of the same model without it",
              "memory_method": ("torch.cuda.max_memory_allocated above the allocation before the step"
                                if device.type == "cuda" else
                                "torch profiler allocation trace (profile_memory): peak of torch tensors "
                                "allocated during the step above those alive before it"),
              "step_s_ckpt": t_ckpt, "step_s_plain": t_plain, "time_ratio": t_ckpt / t_plain,
              "ours_compile": "per-block torch.compile" if ctx.compile else "eager",
              "higher_is_better": False,
              "note": f"ratio = memory fraction kept; step time x{t_ckpt / t_plain:.2f} with checkpointing"}
    return Result("grad_ckpt_memory", peaks["ckpt"], peaks["plain"], "MB", device.type, config)
