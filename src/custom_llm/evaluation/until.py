"""Batched generation that stops on strings: the ``generate_until`` request of lm-evaluation-harness.

The engine (:class:`~custom_llm.generation.Engine`) produces token ids; a row is finished once it has
produced an end-of-sequence id or its decoded text contains one of the stop strings. Rows are
decoded every ``check_every`` tokens (not after each, which would wait on the device every step),
and generation ends when every row is finished or the token budget is spent. The caller cuts the
text at the first stop string, so the few tokens a row may produce past its stop do not matter.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..generation import Engine, SamplingParams


def generate_until(engine: Engine, decode: Callable[[Sequence[int]], str], prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, stops: Sequence[str], params: SamplingParams,
                   generator: Optional[torch.Generator] = None, eos_ids: Iterable[int] = (),
                   check_every: int = 8) -> list[list[int]]:
    """New token ids per prompt, each cut before its first end-of-sequence id (stop strings left in)."""
    eos = set(eos_ids)
    steps: list[torch.Tensor] = []
    finished = [False] * len(prompts)
    for i, token in enumerate(engine.stream(prompts, max_new_tokens, params, generator)):
        steps.append(token)
        if (i + 1) % check_every == 0:
            rows = torch.stack(steps, dim=1).tolist()  # (B, i + 1)
            for b, row in enumerate(rows):
                if not finished[b]:
                    kept = _cut(row, eos)
                    finished[b] = len(kept) < len(row) or has_stop(decode(kept), stops)
            if all(finished):
                break
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    return [_cut(row, eos) for row in rows]


def _cut(row: list[int], eos: set[int]) -> list[int]:
    """``row`` up to (without) its first end-of-sequence id."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row



def has_stop(text: str, stops: Sequence[str]) -> bool:
    """Whether ``text`` contains one of the (non-empty) stop strings."""
    return any(stop and stop in text for stop in stops)
