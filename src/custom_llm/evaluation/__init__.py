"""Evaluation on standard benchmarks: our models in lm-evaluation-harness, and a run's report card.

* :mod:`.harness`: :class:`CustomLLM`, the lm-eval ``LM`` registered as ``custom-llm`` (importing it,
  or ``from custom_llm.evaluation import CustomLLM``, registers it; lm-eval is imported only then);
* :mod:`.scoring`: log-likelihoods of continuations, batched by length with shared prefixes;
* :mod:`.until`: batched generation that stops on strings;
* :mod:`.tasks`: running harness tasks (built-in or local YAML + JSONL) and printing the table;
* :mod:`.report`: the Markdown + PNG summary of a training run.
"""

from .scoring import score_requests


def __getattr__(name: str):
    if name == "CustomLLM":  # imports lm-eval (a few seconds) only when asked for
        from .harness import CustomLLM

        return CustomLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CustomLLM", "score_requests"]
