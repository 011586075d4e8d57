"""AdamW against Lion against Muon: the same model, data, steps and seed; tokens and time to a common loss.

Per preset (``optimizers``: nanoGPT's char-level Shakespeare recipe, ``shakespeare-char-cpu`` on the
CPU and ``shakespeare-char`` on CUDA; ``optimizers_tiny``: the default ``tiny`` job), three runs of
the trainer differ only in ``train.optimizer``:

- AdamW with the preset's settings (the reference);
- Lion at a third of the preset's lr and three times its weight decay, betas (0.9, 0.99), as Chen
  et al. 2023 advise when moving from AdamW;
- Muon (Jordan et al. 2024) for the blocks' matrices, AdamW for the rest: the settings of the
  preset's ``-muon`` variant where there is one (``shakespeare-char-cpu-muon``), else the preset's
  with the TrainConfig defaults ``muon_lr`` etc.

The target is the worst of the three final validation losses, so every run reaches it; each run's
tokens and wall time to first reach it come from its evaluation rows. ``ours`` is Muon's tokens to
the target, ``ref`` AdamW's (lower is better). The config also holds tokens to AdamW's own final
loss (the issue's "fewer tokens than AdamW" figure), final losses, and step times.

The three runs train at the same time in three worker processes (a third of the threads each), so a
change in the load of a shared machine hits all of them alike; step times are measured before that,
in this process, alternating one full training step (forward, backward, clipping, optimizer) of each
optimizer on the preset's model and batch, medians over the rounds.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from .context import Context
from .core import Result, median, time_alternating

OPTIMIZER_NAMES = ("adamw", "lion", "muon")


def _overrides(name: str, preset: str) -> dict:
    """The train-config changes of one run: its optimizer; Lion's rescaled lr and weight decay; Muon's
    settings from the preset's ``-muon`` variant where there is one."""
    from ..training import TRAIN_PRESETS, TrainConfig

    if name == "muon":
        tuned = TRAIN_PRESETS.get(f"{preset}-muon", {})
        return {"optimizer": "muon", **{k: v for k, v in tuned.items() if TRAIN_PRESETS[preset].get(k) != v}}
    if name != "lion":
        return {"optimizer": name}
    base = TrainConfig(**{k: v for k, v in TRAIN_PRESETS[preset].items() if k != "curriculum"})
    return {"optimizer": "lion", "lr": base.lr / 3, "weight_decay": 3 * base.weight_decay, "beta1": 0.9, "beta2": 0.99}


def _data(preset: str, data: Optional[str], tc, vocab_size: int):
    from ..data import prepare_data

    sources = [data] if data else None
    return prepare_data(sources, tokenizer_kind=tc.tokenizer, vocab_size=vocab_size, val_fraction=tc.val_fraction)


def _train_run(job: dict) -> dict:
    """One training run (in a worker process): its evaluation rows with tokens and seconds."""
    from ..training import resolve_run_config, train
    from ..training.metrics import read_metrics

    torch.set_num_threads(job["threads"])
    mc, tc = resolve_run_config(job["preset"], None, {"model": {}, "train": job["train"]})
    tokenizer, dataset = _data(job["preset"], job["data"], tc, mc.vocab_size)
    mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
    start = time.perf_counter()
    result = train(mc, tc, Path(job["run_dir"]), dataset, tokenizer, progress=False)
    wall = time.perf_counter() - start
    seconds, last_tokens, evals = 0.0, 0, []
    for row in read_metrics(Path(job["run_dir"]) / "metrics.jsonl"):  # wall time rebuilt from logged rates
        if row.get("tokens_per_s"):
            seconds += (row["tokens"] - last_tokens) / row["tokens_per_s"]
            last_tokens = row["tokens"]
        if row.get("val_loss") is not None:
            evals.append({"step": row["step"], "tokens": row["tokens"], "val_loss": row["val_loss"],
                          "seconds": round(seconds, 1)})
    return {"final": result.val_loss, "steps": result.step, "tokens": result.tokens, "wall_s": round(wall, 1),
            "evals": evals}


def _first_reaching(evals: list[dict], target: float) -> Optional[dict]:
    return next((e for e in evals if e["val_loss"] <= target + 1e-9), None)


def _step_times(ctx: Context, preset: str, data: Optional[str], runs: dict[str, dict], repeats: int) -> dict[str, float]:
    """Median seconds of one full training step per optimizer, alternating, on the preset's last batch shape."""
    from ..model import Transformer
    from ..training import build_optimizer, resolve_run_config

    steps = {}
    for name, train_overrides in runs.items():
        mc, tc = resolve_run_config(preset, None, {"model": {}, "train": train_overrides})
        tokenizer, dataset = _data(preset, data, tc, mc.vocab_size)
        mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
        batch, seq_len = (tc.curriculum[-1].batch_size, tc.curriculum[-1].seq_len) if tc.curriculum else \
            (tc.batch_size, tc.seq_len or mc.max_seq_len)
        torch.manual_seed(ctx.seed)
        model = Transformer(mc).to(ctx.device)
        optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps,
                                    tc.decay_embeddings, muon_lr=tc.muon_lr, muon_momentum=tc.muon_momentum,
                                    muon_weight_decay=tc.muon_weight_decay)
        start = torch.randint(0, len(dataset.train) - seq_len - 1, (batch,), generator=torch.Generator().manual_seed(0))
        rows = torch.stack([torch.from_numpy(dataset.train[s:s + seq_len + 1].astype("int64")) for s in start.tolist()])
        x, y = rows[:, :-1].to(ctx.device), rows[:, 1:].to(ctx.device)

        def step(model=model, optimizer=optimizer, x=x, y=y, clip=tc.grad_clip) -> None:
            model.compute_loss(x, y).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times = time_alternating(steps, ctx.device, repeats, warmup=2)
    return {name: median(t) for name, t in times.items()}


def compare_optimizers(ctx: Context, preset: str, data: Optional[str], case: str) -> Result:
    """Train the preset with each optimizer (concurrently) and compare tokens and time to a common loss."""
    overrides = {"device": ctx.device.type, "compile": ctx.compile, "seed": ctx.seed, "save_every": 0,
                 "time_limit": None, "keep_checkpoints": 1, "sample_tokens": 0}
    if preset == "tiny":  # denser, larger validation estimates than the preset's 4 x 8 sequences
        overrides.update(eval_every=40, eval_batches=16)
    else:  # 10 evaluations, each over the whole validation text (as the shakespeare_char case's final one)
        overrides.update(eval_every=200)
    if ctx.quick:  # a smoke test of the machinery
        overrides.update(max_steps=12, eval_every=6, warmup_steps=2, eval_batches=2, curriculum=[])
    runs = {name: {**overrides, **_overrides(name, preset)} for name in OPTIMIZER_NAMES}
    step_s = _step_times(ctx, preset, data, runs, 3 if ctx.quick else max(10, ctx.sizes.repeats * 5))
    threads = max(1, torch.get_num_threads() // len(runs))
    with tempfile.TemporaryDirectory(prefix="custom-llm-bench-optimizers-") as tmp:
        jobs = {name: {"preset": preset, "data": data, "train": train, "threads": threads,
                       "run_dir": str(Path(tmp) / name)} for name, train in runs.items()}
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
            futures = {name: pool.submit(_train_run, job) for name, job in jobs.items()}
            done = {name: future.result() for name, future in futures.items()}
    target = max(run["final"] for run in done.values())
    adamw_final = done["adamw"]["final"]
    summary = {}
    for name, run in done.items():
        hit, hit_adamw = _first_reaching(run["evals"], target), _first_reaching(run["evals"], adamw_final)
        summary[name] = {"final_val_loss": round(run["final"], 4), "tokens_to_target": hit and hit["tokens"],
                         "seconds_to_target": hit and hit["seconds"],
                         "tokens_to_adamw_final": hit_adamw and hit_adamw["tokens"],
                         "step_ms": round(1000 * step_s[name], 1), "wall_s": run["wall_s"],
                         "train": runs[name], "evals": run["evals"]}
    muon, adamw = summary["muon"], summary["adamw"]
    config = {"preset": preset, "data": data or "<default corpus>", "target": round(target, 4),
              "steps": done["adamw"]["steps"], "tokens": done["adamw"]["tokens"], "threads_per_run": threads,
              "muon_step_overhead": round(step_s["muon"] / step_s["adamw"] - 1, 3),
              "muon_fewer_tokens_to_adamw_final": (adamw["tokens_to_adamw_final"] / muon["tokens_to_adamw_final"]
                                                   if muon["tokens_to_adamw_final"] else None),
              "ours": "Muon (block matrices) + AdamW (the rest): tokens to the target",
              "ref": "AdamW with the preset's settings: tokens to the target",
              "runs": summary, "higher_is_better": False}
    return Result(case, muon["tokens_to_target"], adamw["tokens_to_target"], "tokens to target", ctx.device.type,
                  config)


def optimizers(ctx: Context) -> Result:
    """nanoGPT's char-level Shakespeare recipe for the device, trained with AdamW, Lion and Muon."""
    from .shakespeare_case import PUBLISHED, find_text

    preset = PUBLISHED["cuda" if ctx.device.type == "cuda" else "cpu"][0]
    return compare_optimizers(ctx, preset, str(find_text(ctx.data)), "optimizers")


def optimizers_tiny(ctx: Context) -> Result:
    """The default ``tiny`` job (default corpus, BPE, curriculum 64 -> 128), trained with AdamW, Lion and Muon."""
    return compare_optimizers(ctx, "tiny", None, "optimizers_tiny")
