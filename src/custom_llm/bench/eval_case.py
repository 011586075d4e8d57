"""lm-evaluation-harness ``loglikelihood`` requests per second: our ``custom-llm`` model type against the
harness's own ``HFLM`` on the Hugging Face export of the same weights.

The task is fixed and local (no download): multiple-choice questions in the shape of HellaSwag, built
from the default corpus (the running Python's standard library). Each question is a context of about
``context_chars`` characters; its four choices are the text that really follows and three other
passages of about ``choice_chars`` characters. Both sides get the same ``Instance`` objects through
``LM.loglikelihood`` (tokenization included), the same batch size, device and dtype. HFLM runs as the
harness configures it by default (``logits_cache`` on; it only helps single-token continuations).
Unit: requests (context, choice pairs) per second. Our advantage comes from :mod:`custom_llm.evaluation.scoring`:
each context runs once for its four choices, and the LM head runs only where a choice token is scored.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .context import Context, build_model
from .core import Result, median, paired_ratio, time_alternating

QUESTIONS = {"cpu": 32, "cuda": 256, "quick": 4}
CHARS = {"cpu": (600, 120), "cuda": (2400, 240), "quick": (120, 30)}
"""(context, choice) characters: about 170 + 35 tokens on the CPU (vocabulary 8192, context 256)."""
CHOICES = 4


def _questions(n: int, texts: list[str], context_chars: int, choice_chars: int) -> list[tuple[str, list[str]]]:
    """``n`` (context, four choices) pairs cut from consecutive text; the first choice is the true continuation."""
    text = "\n".join(texts)
    step = context_chars + choice_chars
    out = []
    for q in range(n):
        start = q * step
        context = text[start:start + context_chars]
        true = text[start + context_chars:start + step]
        others = [text[(q * 7 + k) * step % (len(text) - step):][:choice_chars] for k in range(1, CHOICES)]
        out.append((context, [true, *others]))
    return out


def eval_loglikelihood(ctx: Context) -> Result:
    """Requests/s of multiple-choice loglikelihood scoring, ours against lm-eval's HFLM."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise RuntimeError(f"the eval_loglikelihood case needs lm-eval with its hf extra ({exc})") from None
    from ..evaluation.harness import CustomLLM
    from ..interop import export_hf
    from ..tokenizers import train_tokenizer
    from .tokenize_case import _corpus_slice

    s, device = ctx.sizes, ctx.device
    kind = "quick" if ctx.quick else device.type
    n, (context_chars, choice_chars) = QUESTIONS[kind], CHARS[kind]
    texts = [d.text for d in _corpus_slice(max(n * (context_chars + choice_chars) * 2, 200_000))]
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=s.tokenizer_vocab)
    model = build_model(s.dense, device, ctx.seed, vocab_size=tokenizer.vocab_size).eval()
    dtype = s.decode_dtype
    model = model.to(dtype)
    requests = [Instance("loglikelihood", {}, (context, " " + choice), i)
                for context, choices in _questions(n, texts, context_chars, choice_chars) for i, choice in enumerate(choices)]
    batch = s.batch * 2
    ours = CustomLLM(model=model, tokenizer=tokenizer, batch_size=batch)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, Path(folder) / "hf", tokenizer=tokenizer)
        hf = HFLM(pretrained=str(Path(folder) / "hf"), device=str(device), batch_size=batch,
                  dtype=str(dtype).replace("torch.", ""), prefix_token_id=tokenizer.eos_id)
    answers: dict[str, list] = {}

    def run(name, lm):
        def call() -> None:
            answers[name] = lm.loglikelihood(requests, disable_tqdm=True)
        return call

    times = time_alternating({"ours": run("ours", ours), "ref": run("ref", hf)}, device, s.repeats, s.warmup)
    diff = max(abs(a[0] - b[0]) for a, b in zip(answers["ours"], answers["ref"]))
    tokens = [len(tokenizer.encode(r.args[0] + r.args[1])) for r in requests]
    config = {"model": dict(s.dense, vocab_size=tokenizer.vocab_size), "dtype": str(dtype).replace("torch.", ""),
              "batch_size": batch, "requests": len(requests), "questions": n, "choices": CHOICES,
              "mean_request_tokens": round(sum(tokens) / len(tokens), 1), "max_abs_logprob_diff": diff,
              "ours": "custom-llm LM (shared-prefix KV reuse, head on scored tokens only)",
              "ref": {"class": "lm_eval HFLM", "logits_cache": True},
              "run_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "paired_ratio": paired_ratio(times),
              "higher_is_better": True}
    return Result("eval_loglikelihood", len(requests) / median(times["ours"]), len(requests) / median(times["ref"]),
                  "requests/s", device.type, config)
