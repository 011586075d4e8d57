"""Turning next-token logits into tokens: repetition penalty, temperature, top-k, top-p, min-p.

The processors run in the order of Hugging Face ``generate``: repetition penalty, then temperature,
top-k, top-p, min-p. Each is a small pure function on logits (B, V), so each can be checked against
a hand-computed case. Sampling takes an explicit ``torch.Generator`` and never synchronises with the
host (no ``.item()``), so it can sit inside a fast decode loop.

* Repetition penalty (Keskar et al. 2019, CTRL): for tokens already in the context, positive logits
  are divided by the penalty, negative ones multiplied by it.
* Top-k (Fan et al. 2018): keep the k largest logits (ties with the k-th are kept).
* Top-p, nucleus (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
  probabilities sum to at least p.
* Min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the largest.
* Presence and frequency penalties (OpenAI's definitions): a token generated c > 0 times so far has
  ``c * frequency_penalty + presence_penalty`` subtracted from its logit. They count generated tokens
  only (not the prompt), and run right after the repetition penalty.

Legend: B batch, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; the defaults are greedy decoding."""

    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with probability mass >= top_p; 1 turns it off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 turns it off."""
    repetition_penalty: float = 1.0
    """CTRL repetition penalty on tokens already in the context; 1 turns it off."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty, in [-2, 2]: subtracted once from the logit of every token generated so far."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty, in [-2, 2]: subtracted from a token's logit once per time it was generated."""

    def __post_init__(self) -> None:
        checks = [
            (_finite(self.temperature) and self.temperature >= 0, f"temperature must be a finite number >= 0 (got {self.temperature})"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (got {self.top_k})"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty})"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2] (got {self.presence_penalty})"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2] (got {self.frequency_penalty})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_tokens(self) -> bool:
        """True when the presence or frequency penalty needs counts of the generated tokens."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL rule on tokens with ``seen`` (B, V) True: positive logits / penalty, negative * penalty."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's rule: logit - count * frequency - (count > 0) * presence, ``counts`` (B, V) of generated tokens."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (k >= vocabulary keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches ``p`` (the top token always stays)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's largest probability."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """All enabled processors in Hugging Face order; greedy stops after the penalties.

    ``seen`` (B, V) bool: tokens in the context (repetition penalty); ``counts`` (B, V) float: how often
    each token was generated (presence and frequency penalties).
    """
    logits = logits.float()
    if params.repetition_penalty != 1 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.counts_tokens and counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) -> (B,), without a host sync.

    argmax(p_i / E_i) with E_i ~ Exponential(1) is distributed as p (the exponential-race form of
    the Gumbel-max trick), and unlike ``torch.multinomial`` it never waits for the device.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
    return torch.argmax(probs / race, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): processors, then argmax (greedy) or a random draw."""
    logits = process_logits(logits, params, seen, counts)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return sample_from_logits(logits, generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0):
    """Log-probabilities under the model's raw distribution (before any processor), as OpenAI reports them.

    logits (B, V), tokens (B,) -> (chosen (B,), top values (B, n), top ids (B, n)) with n = ``top_n``.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logprobs.gather(-1, tokens.view(-1, 1)).squeeze(-1)  # (B,)
    top = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1)
    return chosen, top.values, top.indices
