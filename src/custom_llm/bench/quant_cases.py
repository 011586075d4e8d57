"""Quantized and speculative decoding cases: batch-1 greedy new tokens/s against Hugging Face fp32 ``generate``.

``decode_int8`` / ``decode_int4``: our :class:`~custom_llm.generation.Engine` on the bench's dense model
with int8 (per channel) or int4 (groups of 32) weights, compiled with ``--compile``, against the HF twin's
fp32 ``generate(do_sample=False)``; our own fp32 decode of the same model runs in the same rounds and
is reported in the config (``vs_our_fp32``).

``speculative``: :class:`~custom_llm.generation.speculative.SpeculativeDecoder` (target + draft) against
the target alone decoding with the same Engine settings, both greedy, so the outputs must be equal
(checked and recorded). Real acceptance needs a draft trained on the target's data: ``--data DIR``
with ``DIR/target`` and ``DIR/draft`` checkpoints (or run directories). Without it the case builds a
self-speculative pair from the bench model (the draft is the target's first layers with its
embedding and head, as in LayerSkip, Elhoushi et al. 2024) on random weights, which measures the
machinery but not a useful acceptance rate.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .context import Context, build_model, dtype_name
from .core import Result, median, paired_ratio, time_alternating
from .hf_reference import hf_twin, transformers_version
from .inference_cases import _common_prefix, _prompt

INT4_GROUP = 32


def decode_int8(ctx: Context) -> Result:
    """Batch-1 greedy tokens/s of int8 weights against HF fp32 generate."""
    return _decode_quantized(ctx, "int8")


def decode_int4(ctx: Context) -> Result:
    """Batch-1 greedy tokens/s of int4 (group 32) weights against HF fp32 generate."""
    return _decode_quantized(ctx, "int4")


def _decode_quantized(ctx: Context, mode: str) -> Result:
    from ..generation import Engine
    from ..generation.quant import quantize_model

    s, device = ctx.sizes, ctx.device
    n = s.decode_new_tokens
    model = build_model(s.dense, device, ctx.seed, max_seq_len=max(s.dense["max_seq_len"], s.decode_prompt + n)).eval()
    hf = hf_twin(model)
    quantized = quantize_model(copy.deepcopy(model).requires_grad_(False), mode, INT4_GROUP)
    model.to(s.decode_dtype)
    prompt = _prompt(model.config.vocab_size, s.decode_prompt, device, ctx.seed)[0].tolist()
    engines = {"ours": Engine(quantized, compile=ctx.compile), "fp32": Engine(model, compile=ctx.compile)}
    outputs: dict[str, list[int]] = {}

    def run(name):
        def go() -> None:
            outputs[name] = engines[name].generate([prompt], n)[0]
        return go

    runs = {"ours": run("ours"), "fp32": run("fp32")}
    if hf is not None:
        hf.to(s.decode_dtype).eval()
        hf.generation_config.eos_token_id = None
        ids = torch.tensor([prompt], device=device)

        def ref() -> None:
            with torch.inference_mode():
                hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones_like(ids))

        runs["ref"] = ref
    times = time_alternating(runs, device, s.repeats, s.warmup)
    tps = {name: n / median(t) for name, t in times.items()}
    kernels = sorted({m.kernel for m in quantized.modules() if hasattr(m, "kernel")})
    config = {"model": dict(s.dense), "mode": mode, "group_size": INT4_GROUP if mode == "int4" else None,
              "head_quantized": True, "kernels": kernels, "activations": "bf16 inside the kernels" if device.type == "cpu" else None,
              "batch": 1, "prompt_len": s.decode_prompt, "new_tokens": n,
              "ours": "Engine" + (" (compiled decode)" if ctx.compile else " (eager)"),
              "ref": None if hf is None else {"class": type(hf).__name__, "transformers": transformers_version(),
                                               "dtype": dtype_name(s.decode_dtype), "call": "generate(do_sample=False)"},
              "our_fp32_tokens_per_s": round(tps["fp32"], 1), "vs_our_fp32": round(tps["ours"] / tps["fp32"], 3),
              "greedy_agreement_with_fp32": _common_prefix(outputs["ours"], outputs["fp32"]),
              "run_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "paired_ratio": paired_ratio(times),
              "higher_is_better": True}
    return Result(f"decode_{mode}", tps["ours"], tps.get("ref"), "tokens/s", device.type, config)


def speculative(ctx: Context) -> Result:
    """Target + draft against the target alone: greedy tokens/s at equal output, with the acceptance rate."""
    from ..generation import Engine
    from ..generation.speculative import SpeculativeDecoder, SpeculativeStats

    s, device = ctx.sizes, ctx.device
    n, k = s.decode_new_tokens * 2, 4
    target, draft, source, prompt = _pair(ctx, n)
    decoder = SpeculativeDecoder(target, draft, draft_tokens=k)
    engine = Engine(target, compile=ctx.compile)
    outputs: dict[str, list[int]] = {}

    def ours() -> None:
        decoder.stats = SpeculativeStats()
        outputs["ours"] = decoder.generate(prompt, n)

    def ref() -> None:
        outputs["ref"] = engine.generate([prompt], n)[0]

    times = time_alternating({"ours": ours, "ref": ref}, device, s.repeats, s.warmup)
    stats = decoder.stats
    config = {"source": source, "target": _describe(target), "draft": _describe(draft), "draft_tokens": k,
              "prompt_len": len(prompt), "new_tokens": n, "greedy": True,
              "equal_output": outputs["ours"] == outputs["ref"],
              "greedy_agreement": _common_prefix(outputs["ours"], outputs["ref"]),
              "acceptance_rate": round(stats.acceptance_rate, 3),
              "tokens_per_target_forward": round(n / max(stats.rounds + 1, 1), 2),
              "ref": "Engine (target alone)" + (" compiled" if ctx.compile else " eager"),
              "run_s": {name: [round(t, 4) for t in v] for name, v in times.items()},
              "paired_ratio": paired_ratio(times), "higher_is_better": True}
    return Result("speculative", n / median(times["ours"]), n / median(times["ref"]), "tokens/s", device.type, config)


def _pair(ctx: Context, n: int):
    """(target, draft, description, prompt ids): trained checkpoints from --data DIR, else a self-speculative pair."""
    from ..api import load_model, load_tokenizer

    s, device = ctx.sizes, ctx.device
    folder = Path(ctx.data) if ctx.data else None
    if folder is not None and (folder / "target").exists() and (folder / "draft").exists():
        target = load_model(folder / "target", device=device).eval()
        draft = load_model(folder / "draft", device=device).eval()
        tokenizer = load_tokenizer(folder / "target")
        text = "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Run the command line.\"\"\"\n"
        prompt = [tokenizer.eos_id] + tokenizer.encode(text)
        return target, draft, f"trained checkpoints in {folder}", prompt
    target = build_model(s.dense, device, ctx.seed, max_seq_len=max(s.dense["max_seq_len"], s.decode_prompt + n + 8)).eval()
    draft = copy.deepcopy(target)
    draft.layers = draft.layers[: max(1, len(target.layers) // 3)]
    draft.layer_windows = draft.layer_windows[: len(draft.layers)]
    prompt = _prompt(target.config.vocab_size, s.decode_prompt, device, ctx.seed)[0].tolist()
    return target, draft, "self-speculative: the draft is the target's first layers (random weights)", prompt


def _describe(model: torch.nn.Module) -> dict:
    c = model.config
    return {"d_model": c.d_model, "n_layers": len(model.layers), "vocab_size": c.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}


QUALITY_TOKENS = 16384  # predictions per variant and text (the quick sizes use 1024)


def quant_quality(ctx: Context) -> Result:
    """Perplexity of fp32 / int8 / int4 (groups 32, 64, 128) weights on held-out text; ratio int4-g32 / fp32.

    Texts: the default corpus's validation documents (the training split's hash rule, 5%) and the last
    10% of tinyshakespeare when it is found. The model: ``--data DIR``'s ``DIR/target`` checkpoint
    (trained), else the bench's random model (whose perplexities only show the mechanics).
    """
    from ..api import load_model, load_tokenizer
    from ..data import default_corpus_documents, split_documents
    from ..generation.evaluate import evaluate_texts
    from ..generation.quant import quantize_model
    from .shakespeare_case import find_text

    device = ctx.device
    folder = Path(ctx.data) / "target" if ctx.data else None
    if folder is None or not folder.exists():
        raise_missing = ctx.quick
        if not raise_missing:
            from ..errors import UserError

            raise UserError("quant_quality needs --data DIR with a trained DIR/target checkpoint")
    float_model = load_model(folder, device=device) if folder is not None and folder.exists() else None
    tokenizer = load_tokenizer(folder) if float_model is not None else None
    if float_model is None:  # --quick smoke run: a random model and a character tokenizer
        from ..tokenizers.char import CharTokenizer

        tokenizer = CharTokenizer.train([chr(c) for c in range(32, 127)] + ["\n"])
        float_model = build_model({**ctx.sizes.dense, "vocab_size": tokenizer.vocab_size + 28}, device, ctx.seed).eval()
    budget = 1024 if ctx.quick else QUALITY_TOKENS
    texts = {"default_corpus_val": [d.text for d in split_documents(default_corpus_documents(), 0.05)[1]]}
    try:
        shakespeare = find_text(None).read_text(encoding="utf-8")
        texts["tinyshakespeare_last10pct"] = [shakespeare[int(len(shakespeare) * 0.9):]]
    except Exception:  # noqa: BLE001 - the file is optional
        pass
    variants = [("fp32", None, 0), ("int8", "int8", 0), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64),
                ("int4-g128", "int4", 128)]
    table: dict[str, dict[str, float]] = {}
    for name, mode, group in variants:
        if group and float_model.config.d_model % group:
            continue  # a group wider than the quick model's rows
        model = float_model if mode is None else quantize_model(copy.deepcopy(float_model).requires_grad_(False),
                                                                 mode, group or 32)
        for text_name, docs in texts.items():
            result = evaluate_texts(model, tokenizer, docs, start_id=tokenizer.eos_id, seq_len=model.config.max_seq_len,
                                    batch_size=8, max_tokens=budget)
            table.setdefault(text_name, {})[name] = round(result.perplexity, 4)
    main = table["default_corpus_val"]
    config = {"model": _describe(float_model), "tokens_per_eval": budget, "perplexity": table,
              "ppl_ratio_vs_fp32": {t: {k: round(v / row["fp32"], 4) for k, v in row.items()} for t, row in table.items()},
              "head_quantized": True, "source": str(folder) if folder else "random model (--quick)",
              "higher_is_better": False}
    return Result("quant_quality", main["int4-g32"], main["fp32"], "perplexity", device.type, config)
