"""Log-likelihood of continuations given contexts: batched by length, with shared prefixes computed once.

This is the engine behind the harness's ``loglikelihood`` and ``loglikelihood_rolling`` requests. A
request is (context ids, continuation ids); its answer is the summed log-probability of the
continuation tokens and whether greedy decoding would have produced exactly them.

Which tokens are scored. As lm-evaluation-harness's ``HFLM`` does it: the input is the last
``max_length + 1`` tokens of context + continuation with the final one dropped, so an over-long
context loses its oldest tokens (left truncation), and only the continuation's tokens are scored.
That input is split into

* the *prefix*: every input token up to and including the one that predicts the first continuation
  token (for an untruncated request: the whole context), and
* the *tail*: the remaining inputs (the continuation without its last token).

Why it is fast. Multiple-choice tasks ask for several continuations of one context. Requests with
the same prefix share one forward pass over it. Work goes in *prefix groups*: up to ``batch_size``
distinct prefixes run together in one forward pass (left-padded into a
:class:`~custom_llm.generation.KVCache`); then the rows that continue them run in forward passes of
up to ``batch_size`` rows, each row on a copy of its prefix's keys and values, computing only its
tail. No forward pass holds more than ``batch_size`` sequences, as in ``HFLM``, but a four-choice
question costs one context and four short tails instead of four whole sequences. The LM head and the
softmax run only where a continuation token is scored, not over every padded position. Requests are
sorted by prefix length (longest first, so the first group shows the memory peak) with equal prefixes
side by side, so passes are dense and reuse is maximal.

Legend: B rows (requests) in a forward pass, U distinct prefixes in a group, P padded prefix length,
C longest tail in a group, T padded tail length of a pass, M real tail tokens of a pass, N scored
tokens of a pass, V vocabulary, D model width, K kv heads, S cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..generation import KVCache, prefill


@dataclass(frozen=True)
class Scored:
    """One request split for scoring: the shared prefix, the per-row tail, and the target tokens."""

    prefix: tuple[int, ...]
    """Inputs up to the one that predicts the first target (never empty)."""
    tail: tuple[int, ...]
    """The remaining inputs (len(targets) - 1 of them)."""
    targets: tuple[int, ...]
    """The continuation tokens whose log-probabilities are summed."""


def split_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Scored:
    """Truncate context + continuation from the left to ``max_length`` inputs and split it for scoring."""
    if not context or not continuation:
        raise ValueError("a request needs at least one context token and one continuation token")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit a context of {max_length}")
    inputs = (list(context) + list(continuation))[-(max_length + 1):][:-1]
    cut = len(inputs) - len(continuation) + 1  # inputs[cut - 1] predicts continuation[0]
    return Scored(tuple(inputs[:cut]), tuple(inputs[cut:]), tuple(continuation))


def plan_groups(items: Sequence[Scored], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` in prefix groups of at most ``batch_size`` distinct prefixes, longest prefix
    first; a group's rows are in order (equal prefixes adjacent, longer tails first)."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].prefix), items[i].prefix, -len(items[i].tail)))
    groups: list[list[int]] = []
    distinct = 0
    for i in order:
        new_prefix = not groups or items[groups[-1][-1]].prefix != items[i].prefix
        if not groups or (new_prefix and distinct == batch_size):
            groups.append([])
            distinct = 0
        distinct += new_prefix
        groups[-1].append(i)
    return groups


def score_requests(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   max_length: int, batch_size: int) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy?) for each (context ids, continuation ids) request."""
    items = [split_request(context, continuation, max_length) for context, continuation in requests]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for group in plan_groups(items, batch_size):
        for index, answer in zip(group, score_group(model, [items[i] for i in group], batch_size)):
            results[index] = answer
    return results


@torch.inference_mode()
def score_group(model: torch.nn.Module, rows: Sequence[Scored], batch_size: int) -> list[tuple[float, bool]]:
    """Score one prefix group: its distinct prefixes in one pass, then its rows' tails ``batch_size`` at a time."""
    device = model.embed_tokens.weight.device
    prefixes = list(dict.fromkeys(row.prefix for row in rows))  # distinct, in order
    index_of = {prefix: u for u, prefix in enumerate(prefixes)}
    P = max(len(p) for p in prefixes)
    C = max(len(row.tail) for row in rows)

    # One layout (P + C slots) for the prefix cache and every row cache, so whole buffers copy across.
    cache = KVCache.for_model(model, len(prefixes), P + C)
    tokens = torch.zeros(len(prefixes), P, dtype=torch.long)  # (U, P), left-padded
    for u, prefix in enumerate(prefixes):
        tokens[u, P - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
    cache.reset(torch.tensor([P - len(p) for p in prefixes], device=device))
    first = prefill(model, cache, tokens.to(device))  # (U, V): the logits for each prefix's first target

    answers: list[tuple[float, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        which = torch.tensor([index_of[row.prefix] for row in chunk], device=device)  # (B,) row -> prefix
        answers += _score_rows(model, cache, first, which, chunk, P, C)
    return answers


def _score_rows(model: torch.nn.Module, cache: KVCache, first: torch.Tensor, which: torch.Tensor,
                rows: Sequence[Scored], P: int, C: int) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy?) of rows whose prefixes are in ``cache`` (``first``: their next-token logits)."""
    device = which.device
    # Flat lists of scored positions: every row's first target, then the targets its tail predicts.
    logits = [first.index_select(0, which)]  # (B, V)
    targets = [row.targets[0] for row in rows]
    row_of = list(range(len(rows)))
    if any(row.tail for row in rows):
        logits.append(_tail_logits(model, cache, which, rows, P, C))  # (M, V), row-major over real tail slots
        for b, row in enumerate(rows):
            targets.extend(row.targets[1:])
            row_of.extend([b] * len(row.tail))
    scored = torch.cat(logits).float()  # (N, V)
    targets_t = torch.tensor(targets, device=device)  # (N,)
    row_t = torch.tensor(row_of, device=device)  # (N,)
    logprobs = F.log_softmax(scored, dim=-1).gather(1, targets_t.unsqueeze(1)).squeeze(1)  # (N,)
    wrong = (scored.argmax(dim=-1) != targets_t).float()  # (N,)
    totals = torch.zeros(len(rows), device=device).index_add_(0, row_t, logprobs)  # (B,)
    misses = torch.zeros(len(rows), device=device).index_add_(0, row_t, wrong)  # (B,)
    return [(float(t), bool(m == 0)) for t, m in zip(totals.tolist(), misses.tolist())]


def _tail_logits(model: torch.nn.Module, prefix_cache: KVCache, which: torch.Tensor, rows: Sequence[Scored],
                 P: int, C: int) -> torch.Tensor:
    """Logits (M, V) at the M real tail positions of ``rows`` (row by row), after each row's prefix.

    Every row gets a copy of its prefix's cached keys and values and runs its tail at times
    P .. P + T - 1 (T: the longest tail here). Tails are right-padded; causal attention keeps that
    padding invisible to the real tokens before it. The LM head runs only on the real positions.
    """
    device = which.device
    B, T = len(rows), max(len(row.tail) for row in rows)
    cache = KVCache.for_model(model, B, P + C)
    for mine, theirs in zip(cache.keys + cache.values, prefix_cache.keys + prefix_cache.values):
        mine.copy_(theirs.index_select(0, which))  # (B, K, S, D): each row starts from its prefix's keys
    pad = prefix_cache.pad.index_select(0, which)  # (B,)
    cache.reset(pad)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, :len(row.tail)] = torch.tensor(row.tail, dtype=torch.long)
    positions = torch.arange(P, P + T, device=device) - pad.unsqueeze(1)  # (B, T)
    hidden = model.hidden_states(tokens.to(device), positions=positions, kv_cache=cache.prefill_view(P, T))  # (B, T, D)
    lengths = torch.tensor([len(row.tail) for row in rows], device=device)  # (B,)
    real = torch.arange(T, device=device) < lengths.unsqueeze(1)  # (B, T)
    return model.lm_head(hidden[real])  # (M, V)
