"""Training steps of the small presets: today's defaults against the code before this change, side by side.

``small_steps`` (``shakespeare-char-cpu``, nanoGPT's laptop recipe on Shakespeare) and
``small_steps_tiny`` (the default ``tiny`` job on the bundled corpus, at its last curriculum stage's
batch shape). Three trainers on the same model, seed and batches, built with the trainer's own
``build_parts`` and stepped with its ``train_step``, run in turn, a chunk of steps each:

- ``ref``: the path before this change, the trainer's CPU default then: fp32, eager;
- ``ours``: the defaults now: ``precision auto`` (bf16 autocast with fp32 attention on a CPU with AMX,
  fp32 elsewhere) and ``compile`` as ``--compile`` says (off on the CPU by default);
- ``ours_compiled``: the same with ``train.compile true``, its compile time counted in its first chunk
  (not with ``--compile``, where ``ours`` is compiled, nor with ``--quick``).

Reported: tokens/s over all measured steps with every first step (and compile) included, steady-state
step times, the time of the first step, the projected wall time of the preset's whole run with the
compile time included, and each side's mean training loss over the last chunk (same batches: bf16
should track fp32). ``ours`` / ``ref`` is the tokens/s ratio (higher is better).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

from .context import Context
from .core import Result, median

STEPS = {"shakespeare-char-cpu": 240, "tiny": 90}
"""Measured steps per side (the presets' whole runs: 2000 and 800 steps)."""
CHUNK = {"shakespeare-char-cpu": 20, "tiny": 10}


def small_steps(ctx: Context) -> Result:
    """shakespeare-char-cpu: tokens/s of today's defaults against the fp32 eager path before them."""
    from .shakespeare_case import find_text

    return compare_step_paths(ctx, "shakespeare-char-cpu", str(find_text(ctx.data)), "small_steps")


def small_steps_tiny(ctx: Context) -> Result:
    """tiny: tokens/s of today's defaults against the fp32 eager path before them."""
    return compare_step_paths(ctx, "tiny", None, "small_steps_tiny")


def compare_step_paths(ctx: Context, preset: str, data: Optional[str], case: str) -> Result:
    """Step the preset's model with each side's trainer in turn, a chunk at a time (see the module docstring);
    the learning rate is the preset's peak throughout (no schedule: only speed and agreement are measured).
    ``data``: the text file to train on, None for the default corpus."""
    from ..training import resolve_run_config
    from ..training.parts import build_parts
    from ..training.plan import StepPlan
    from ..training.step import train_step
    from .optimizer_case import _data

    sides = {"ref": {"precision": "fp32", "compile": False},
             "ours": {"precision": "auto", "compile": ctx.compile},
             "ours_compiled": {"precision": "auto", "compile": True}}
    if ctx.compile or ctx.quick:
        del sides["ours_compiled"]  # ours is compiled already; a smoke test skips the compile
    base = {"device": ctx.device.type, "seed": ctx.seed}
    mc, tc = resolve_run_config(preset, None, {"model": {}, "train": base})
    tokenizer, dataset = _data(preset, data, tc, mc.vocab_size)
    mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
    batch, seq_len = (tc.curriculum[-1].batch_size, tc.curriculum[-1].seq_len) if tc.curriculum else \
        (tc.batch_size, tc.seq_len or mc.max_seq_len)
    plan = StepPlan(batch_size=batch, seq_len=seq_len, micro_steps=tc.grad_accum_steps,
                    micro_batch=batch // tc.grad_accum_steps, lr_factor=1.0)
    parts = {}
    for name, overrides in sides.items():
        parts[name] = build_parts(mc, dataclasses.replace(tc, **overrides, curriculum=[]), dataset.train)
        parts[name].loader.set_shape(batch, seq_len)
    steps, chunk = (4, 2) if ctx.quick else (STEPS[preset], CHUNK[preset])
    chunk_s: dict[str, list[float]] = {name: [] for name in sides}
    first_step_s: dict[str, float] = {}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(steps // chunk):
        for name, p in parts.items():
            start = time.perf_counter()
            for _ in range(chunk):
                x, y = p.loader.next_batch()
                losses[name].append(train_step(p, plan, x, y, False).loss)  # .loss: a host float, so synced
                if name not in first_step_s:
                    first_step_s[name] = time.perf_counter() - start
            chunk_s[name].append(time.perf_counter() - start)
    tokens = batch * seq_len * (steps // chunk) * chunk
    tokens_per_s = {name: tokens / sum(t) for name, t in chunk_s.items()}
    step_s = {name: median(t[1:] if len(t) > 1 else t) / chunk for name, t in chunk_s.items()}
    whole_run = {name: first_step_s[name] + (tc.max_steps - 1) * step_s[name] for name in sides}
    config = {"preset": preset, "batch": batch, "seq_len": seq_len, "measured_steps_per_side": (steps // chunk) * chunk,
              "precision": {name: p.rt.precision for name, p in parts.items()},
              "compiled": {name: p.compiled for name, p in parts.items()},
              "tokens_per_s_first_steps_included": {k: round(v, 1) for k, v in tokens_per_s.items()},
              "steady_step_ms": {k: round(v * 1e3, 2) for k, v in step_s.items()},
              "first_step_s": {k: round(v, 2) for k, v in first_step_s.items()},
              f"projected_whole_run_s_{tc.max_steps}_steps": {k: round(v, 1) for k, v in whole_run.items()},
              "whole_run_speedup_vs_ref": {k: round(whole_run["ref"] / v, 3) for k, v in whole_run.items()},
              "last_chunk_mean_loss": {k: round(float(np.mean(v[-chunk:])), 4) for k, v in losses.items()},
              "chunk_s": {k: [round(t, 3) for t in v] for k, v in chunk_s.items()},
              "threads": torch.get_num_threads(), "higher_is_better": True,
              "ours": "precision auto" + (", compiled" if ctx.compile else ", eager"), "ref": "fp32, eager (before)"}
    return Result(case, tokens_per_s["ours"], tokens_per_s["ref"], "tokens/s", ctx.device.type, config)

