"""Inference cases: batch-1 greedy decoding and long-prompt prefill against Hugging Face.

``decode``: new tokens/s of :class:`custom_llm.generation.Engine` (compiled decode step with a static
cache on CUDA, and on the CPU with ``--compile``) against ``generate(do_sample=False)`` of the HF
twin, both producing exactly N tokens after the same prompt; the config records how many of the greedy tokens agree. ``prefill``: prompt
tokens/s of a forward that fills the KV cache (ours: :func:`~custom_llm.generation.prefill` into a
preallocated cache; HF: ``forward(use_cache=True, logits_to_keep=1)`` into its dynamic cache).
"""

from __future__ import annotations

import torch

from .context import Context, build_model, dtype_name
from .core import Result, median, paired_ratio, time_alternating
from .hf_reference import hf_twin, transformers_version


def _models(ctx: Context, max_seq_len: int):
    """Our dense model and its HF twin, in eval mode and the decode dtype."""
    model = build_model(ctx.sizes.dense, ctx.device, ctx.seed, max_seq_len=max_seq_len).eval()
    hf = hf_twin(model)
    dtype = ctx.sizes.decode_dtype
    model.to(dtype)
    if hf is not None:
        hf.to(dtype).eval()
    return model, hf


def _prompt(vocab_size: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=generator).to(device)  # (1, T)


def decode(ctx: Context) -> Result:
    """Batch-1 greedy generation tokens/s against HF generate."""
    from ..generation import Engine

    s, device = ctx.sizes, ctx.device
    n = s.decode_new_tokens
    model, hf = _models(ctx, max(s.dense["max_seq_len"], s.decode_prompt + n))
    prompt = _prompt(model.config.vocab_size, s.decode_prompt, device, ctx.seed)
    engine = Engine(model, compile=ctx.compile, prepare_model=True)  # eager CPU: weights stored transposed
    outputs: dict[str, list[int]] = {}

    def ours() -> None:
        outputs["ours"] = engine.generate([prompt[0].tolist()], n)[0]

    runs = {"ours": ours}
    if hf is not None:
        hf.generation_config.eos_token_id = None

        def ref() -> None:
            with torch.inference_mode():
                out = hf.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  attention_mask=torch.ones_like(prompt))
            outputs["ref"] = out[0, prompt.shape[1]:].tolist()

        runs["ref"] = ref
    times = time_alternating(runs, device, s.repeats, s.warmup)
    config = {"model": dict(s.dense), "dtype": dtype_name(s.decode_dtype), "batch": 1, "prompt_len": s.decode_prompt,
              "new_tokens": n, "ours": "Engine" + (" (compiled decode, static cache)" if engine.compile else " (eager)"),
              "ref": None if hf is None else {"class": type(hf).__name__, "transformers": transformers_version(),
                                               "call": "generate(do_sample=False)",
                                               "attn_implementation": hf.config._attn_implementation},
              "run_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "paired_ratio": paired_ratio(times), "higher_is_better": True}
    if "ref" in outputs:
        config["greedy_prefix_agreement"] = _common_prefix(outputs["ours"], outputs["ref"])
    ours_tps = n / median(times["ours"])
    ref_tps = n / median(times["ref"]) if "ref" in times else None
    return Result("decode", ours_tps, ref_tps, "tokens/s", device.type, config)


def prefill(ctx: Context) -> Result:
    """Long-prompt forward (filling the KV cache) tokens/s against the HF forward."""
    from ..generation import KVCache
    from ..generation import prefill as prefill_fn

    s, device = ctx.sizes, ctx.device
    length = s.prefill_len
    model, hf = _models(ctx, length)
    prompt = _prompt(model.config.vocab_size, length, device, ctx.seed)
    cache = KVCache.for_model(model, 1, length)

    def ours() -> None:
        with torch.inference_mode():
            cache.reset(torch.zeros(1, dtype=torch.long, device=device))
            prefill_fn(model, cache, prompt)

    runs = {"ours": ours}
    if hf is not None:
        def ref() -> None:
            with torch.inference_mode():
                hf(input_ids=prompt, use_cache=True, logits_to_keep=1)

        runs["ref"] = ref
    times = time_alternating(runs, device, s.repeats, s.warmup)
    config = {"model": dict(s.dense), "dtype": dtype_name(s.decode_dtype), "batch": 1, "prompt_len": length,
              "ours": "generation.prefill into a preallocated KVCache",
              "ref": None if hf is None else {"class": type(hf).__name__, "transformers": transformers_version(),
                                               "call": "forward(use_cache=True, logits_to_keep=1)",
                                               "attn_implementation": hf.config._attn_implementation},
              "run_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "paired_ratio": paired_ratio(times), "higher_is_better": True}
    ref_tps = length / median(times["ref"]) if "ref" in times else None
    return Result("prefill", length / median(times["ours"]), ref_tps, "tokens/s", device.type, config)


def _common_prefix(a: list[int], b: list[int]) -> str:
    """'k/n': how many leading tokens two greedy continuations share."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return f"{k}/{max(len(a), len(b))}"
