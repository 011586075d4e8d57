"""Curriculum against a fixed schedule: tokens and wall time to reach the same validation loss.

Two runs of the trainer on the same corpus slice, the same model, seed, learning-rate schedule and
number of optimizer steps (the budget): a fixed run at the full sequence length throughout, and a
curriculum run that warms the sequence length up (T/4, then T/2, then T; Li et al. 2022) at the same
batch size. The target is the worse of the two final validation losses, so both runs reach it;
``ours`` is the curriculum's tokens to first reach it, ``ref`` the fixed run's (lower is better).
Wall times to the target are in the config (the trainer's logged tokens/s, evaluations included).
Whichever wins is reported as measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from .context import Context
from .core import Result


def _dataset(ctx: Context, tmp: Path, vocab_size: int):
    from ..data import build_token_dataset, split_documents
    from ..tokenizers import train_tokenizer
    from .tokenize_case import _corpus_slice

    docs = _corpus_slice(ctx.sizes.curriculum.get("chars", 1_000_000))
    tokenizer = train_tokenizer([d.text for d in docs], kind="auto", vocab_size=vocab_size)
    train_docs, val_docs = split_documents(docs, val_fraction=0.1)
    return tokenizer, build_token_dataset(train_docs, val_docs, tokenizer, cache_dir=tmp / "cache")


def _run(ctx: Context, model_config, dataset, tokenizer, run_dir: Path, stages: list) -> list[dict]:
    """Train one run; its evaluation rows (step, tokens, val_loss, seconds since the start)."""
    from ..training.config import TrainConfig
    from ..training.loop import train

    c = ctx.sizes.curriculum
    steps = c["steps"]
    train_config = TrainConfig(max_steps=steps, batch_size=c["batch"], seq_len=c["seq_len"], lr=2e-3,
                               warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 10), eval_batches=4,
                               eval_batch_size=max(1, c["eval_tokens"] // (4 * c["seq_len"])),
                               log_every=max(1, steps // 10), save_every=0, keep_checkpoints=1,
                               device=ctx.device.type, compile=ctx.compile, seed=ctx.seed, curriculum=stages)
    train(model_config, train_config, run_dir, dataset, tokenizer, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, last_tokens, evals = 0.0, 0, []
    for row in rows:  # wall time rebuilt from the logged rate of each interval
        if row.get("tokens_per_s"):
            seconds += (row["tokens"] - last_tokens) / row["tokens_per_s"]
            last_tokens = row["tokens"]
        if row.get("val_loss") is not None:
            evals.append({"step": row["step"], "tokens": row["tokens"], "val_loss": row["val_loss"],
                          "seconds": round(seconds, 2)})
    return evals


def _first_reaching(evals: list[dict], target: float) -> Optional[dict]:
    return next((e for e in evals if e["val_loss"] <= target + 1e-9), None)


def curriculum(ctx: Context) -> Result:
    """Tokens to a common validation loss: sequence-length curriculum (ours) vs fixed schedule (ref)."""
    from ..config import ModelConfig
    from ..training.curriculum import CurriculumStage

    c = ctx.sizes.curriculum
    T, B, steps = c["seq_len"], c["batch"], c["steps"]
    stages = [CurriculumStage(seq_len=max(8, T // 4), batch_size=B, max_steps=steps // 4),
              CurriculumStage(seq_len=max(8, T // 2), batch_size=B, max_steps=steps // 4),
              CurriculumStage(seq_len=T, batch_size=B)]
    with tempfile.TemporaryDirectory(prefix="custom-llm-bench-curriculum-") as tmp_name:
        tmp = Path(tmp_name)
        tokenizer, dataset = _dataset(ctx, tmp, c["model"]["vocab_size"])
        model_config = ModelConfig(**{**c["model"], "vocab_size": max(c["model"]["vocab_size"], tokenizer.vocab_size),
                                      "max_seq_len": T})
        fixed = _run(ctx, model_config, dataset, tokenizer, tmp / "fixed", [])
        curric = _run(ctx, model_config, dataset, tokenizer, tmp / "curriculum", stages)
    target = max(fixed[-1]["val_loss"], curric[-1]["val_loss"])
    hit_c, hit_f = _first_reaching(curric, target), _first_reaching(fixed, target)
    config = {"model": dict(c["model"]), "steps": steps, "batch": B, "seq_len": T,
              "stages": [[s.seq_len, s.batch_size, s.max_steps] for s in stages], "target_val_loss": target,
              "final_val_loss": {"ours": curric[-1]["val_loss"], "ref": fixed[-1]["val_loss"]},
              "seconds_to_target": {"ours": hit_c["seconds"], "ref": hit_f["seconds"]},
              "steps_to_target": {"ours": hit_c["step"], "ref": hit_f["step"]},
              "ours": "sequence-length curriculum", "ref": "fixed schedule (full length throughout)",
              "evals": {"ours": curric, "ref": fixed}, "higher_is_better": False,
              "note": "ratio = curriculum tokens / fixed tokens to the same validation loss (lower is better)"}
    return Result("curriculum", float(hit_c["tokens"]), float(hit_f["tokens"]), "tokens", ctx.device.type, config)
