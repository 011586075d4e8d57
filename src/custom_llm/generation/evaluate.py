"""Held-out evaluation: loss (nats/token), perplexity and bits per byte.

Bits per byte is tokenizer-independent: total nats over the evaluated text / ln 2 / its UTF-8 bytes,
so models with different tokenizers (or none) can be compared on the same text.

Each document is evaluated as the training data presents it: after a start token (the document
separator), every token of its text is predicted, so the bytes counted are exactly the text's.
Documents are cut into non-overlapping windows of ``seq_len`` predictions; each window starts with a
fresh context (the nanoGPT convention: cheap, slightly pessimistic against a sliding context).

Legend: B batch, T window length, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.loss import perplexity

IGNORE = -100


@dataclass
class EvalResult:
    """What :func:`evaluate_token_rows` returns."""

    loss: float
    """Mean next-token cross-entropy, nats per token."""
    perplexity: float
    """exp(loss)."""
    bits_per_byte: float
    """Total nats / ln 2 / UTF-8 bytes of the evaluated text."""
    tokens: int
    """Predicted tokens."""
    bytes: int
    """UTF-8 bytes of the text those tokens spell."""


def windows(ids: Sequence[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Non-overlapping (input, target) windows over ``ids``: every id after the first is a target once."""
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = list(ids[start:start + seq_len + 1])
        out.append((chunk[:-1], chunk[1:]))
    return out


@torch.inference_mode()
def total_nats(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
               pad_id: int = 0) -> tuple[float, int]:
    """Sum of next-token cross-entropy (nats) over all targets of (input, target) pairs, and their count.

    Short windows are right-padded; padded targets are ignored (causal attention keeps padding
    from affecting the real positions before it).
    """
    device = model.embed_tokens.weight.device
    nats, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        T = max(len(x) for x, _ in batch)
        x = torch.full((len(batch), T), pad_id, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        for b, (inp, tgt) in enumerate(batch):
            x[b, :len(inp)] = torch.tensor(inp)
            y[b, :len(tgt)] = torch.tensor(tgt)
        logits = model(x.to(device)).float()  # (B, T, V)
        y = y.to(device)
        nats += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=IGNORE,
                                reduction="sum").item()
        count += int((y != IGNORE).sum())
    return nats, count


def summarize(nats: float, tokens: int, n_bytes: int) -> EvalResult:
    """Loss, perplexity and bits per byte from totals."""
    loss = nats / max(tokens, 1)
    return EvalResult(loss=loss, perplexity=perplexity(loss),
                      bits_per_byte=nats / math.log(2) / max(n_bytes, 1), tokens=tokens, bytes=n_bytes)


def evaluate_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, start_id: Optional[int],
                   seq_len: int, batch_size: int = 8, max_tokens: Optional[int] = None) -> EvalResult:
    """Evaluate ``model`` on ``texts`` (documents) with ``tokenizer``; at most ``max_tokens`` predictions.

    ``start_id`` is put before every document (the training separator); None predicts from the
    second token on. When ``max_tokens`` cuts a document, its bytes are those of the decoded
    prefix of tokens that was evaluated.
    """
    pairs, n_bytes, budget = [], 0, max_tokens
    for text in texts:
        if budget is not None and budget <= 0:
            break
        ids = tokenizer.encode(text)
        head, body = ([start_id], ids) if start_id is not None else (ids[:1], ids[1:])  # body: the targets
        whole = start_id is not None
        if budget is not None and len(body) > budget:
            body, whole = body[:budget], False
        n_bytes += len(text.encode("utf-8")) if whole else len(tokenizer.decode(body).encode("utf-8"))
        pairs.extend(windows(head + body, seq_len))
        if budget is not None:
            budget -= len(body)
    nats, count = total_nats(model, pairs, batch_size)
    return summarize(nats, count, n_bytes)
