"""Quality anchor: nanoGPT's character-level Shakespeare recipe, trained here, against its published loss.

nanoGPT (Karpathy) publishes the validation loss its recipes reach on tinyshakespeare: ~1.47 for the
GPU "baby GPT" (6 layers, d384, context 256, 5000 steps of 64 x 256) and ~1.88 for its CPU variant
(4 layers, d128, context 64, 2000 steps of 12 x 64). This case trains the same-sized model of this
architecture (RoPE, SwiGLU, RMSNorm instead of learned positions, GELU, LayerNorm) with the same
recipe — presets ``shakespeare-char`` (CUDA) and ``shakespeare-char-cpu`` (CPU) — on the same
90/10 split, and reports the final validation loss (nats per character, lower is better).

``ref`` is the published number, not a measurement in this process (nanoGPT is not a dependency);
the config says so. Its validation estimate averages random batches; ours covers the validation text
once with evenly spaced windows, which is less noisy.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .context import Context
from .core import Result

PUBLISHED = {"cuda": ("shakespeare-char", 1.47), "cpu": ("shakespeare-char-cpu", 1.88)}
"""device -> (our preset with nanoGPT's recipe, nanoGPT's published validation loss)."""
FILE_NAME = "tinyshakespeare.txt"


def find_text(explicit: Optional[str]) -> Path:
    """``explicit`` when given, else tinyshakespeare.txt in ../shared/data beside the checkout or the cwd."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--data {explicit}: no such file")
        return path
    checkout = Path(__file__).resolve().parents[3]
    for folder in (checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "data"):
        if (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    raise UserError(f"the shakespeare_char case needs {FILE_NAME} (nanoGPT's data/shakespeare_char/input.txt): "
                    "pass it with --data PATH")


def shakespeare_char(ctx: Context) -> Result:
    """Train nanoGPT's char-level Shakespeare recipe for this device; final validation loss vs published."""
    from ..data import prepare_data
    from ..training.config import resolve_run_config
    from ..training.loop import train

    path = find_text(ctx.data)
    preset, published = PUBLISHED["cuda" if ctx.device.type == "cuda" else "cpu"]
    overrides = {"device": ctx.device.type, "compile": ctx.compile, "seed": ctx.seed, "save_every": 0}
    if ctx.quick:  # a smoke test of the machinery
        overrides.update(max_steps=20, eval_every=20, warmup_steps=2)
    model_config, train_config = resolve_run_config(preset, None, {"model": {}, "train": overrides})
    with tempfile.TemporaryDirectory(prefix="custom-llm-bench-shakespeare-") as tmp_name:
        tmp = Path(tmp_name)
        tokenizer, dataset = prepare_data([str(path)], tokenizer_kind=train_config.tokenizer,
                                          val_fraction=train_config.val_fraction, cache_dir=tmp / "cache")
        T = model_config.max_seq_len
        # The final estimate covers the validation text about once (nanoGPT samples eval_iters batches).
        eval_batches = 2 if ctx.quick else max(1, len(dataset.val) // (train_config.eval_batch_size * T))
        train_config = dataclasses.replace(train_config, eval_batches=eval_batches)
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
        start = time.perf_counter()
        result = train(model_config, train_config, tmp / "run", dataset, tokenizer, progress=False)
        seconds = time.perf_counter() - start
    full = not ctx.quick and result.step == train_config.max_steps  # the whole recipe ran (no time limit hit)
    config = {"preset": preset, "data": str(path), "steps": result.step, "tokens": result.tokens,
              "batch": train_config.batch_size, "seq_len": T, "wall_s": round(seconds, 1),
              "tokens_per_s": round(result.tokens / seconds, 1),
              "eval_tokens": eval_batches * train_config.eval_batch_size * T,
              "ours": f"preset {preset} (this architecture, nanoGPT's recipe)",
              "ref": "nanoGPT's published validation loss for this recipe (README), not measured here",
              "comparable": full, "higher_is_better": False}
    return Result("shakespeare_char", result.val_loss, published if full else None, "nats/char",
                  ctx.device.type, config)
