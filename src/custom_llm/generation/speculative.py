"""Speculative decoding: a small draft model proposes K tokens, the target checks them in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al.
2023 ("Accelerating LLM Decoding with Speculative Sampling"). One round, with ``cur`` the last
emitted token at time t (in neither cache yet):

1. the draft runs ``cur`` and then its own proposals, sampling d_1..d_K from its distributions q_i;
2. the target runs ``[cur, d_1, ..., d_K]`` at times t..t+K in one forward: distributions p_1..p_{K+1};
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order; at the first rejection the
   token is drawn from norm(max(0, p_i - q_i)) instead and the round ends; when all K are accepted
   a bonus token comes from p_{K+1}. Every emitted token is then distributed exactly as the target
   alone would sample it (greedy: exactly the target's argmax sequence).
4. both caches forget the rejected times. Full-attention layers need nothing (later writes overwrite
   the slots and masks hide times after the query), but a sliding-window layer's ring buffer slot
   for time s held time s - W before the round wrote it, and that key is needed again: those slots
   are saved before each forward (:class:`RingSnapshot`) and put back for the rejected times.

Batch size 1. Sampling parameters are those of :mod:`.sampling` (temperature, top-k, top-p, min-p:
p and q are the processed distributions of each model); the penalties, which depend on the tokens of
the round itself, are not supported.

Legend: V vocabulary, K draft tokens per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..errors import UserError
from .generate import decode_one_token, prefill
from .kv_cache import KVCache
from .sampling import SamplingParams, process_logits

GREEDY = SamplingParams()


@dataclass
class SpeculativeStats:
    """Counters of a generation: draft tokens proposed and accepted, target forwards."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


class RingSnapshot:
    """The ring-buffer slots that a forward over times start..end-1 will overwrite, saved to undo it."""

    def __init__(self, cache: KVCache, start: int, end: int):
        self.times = torch.arange(start, end, device=cache.pad.device)  # (n,)
        self.saved = []
        for layer, window in enumerate(cache.layer_windows):
            if window is not None:
                slots = torch.remainder(self.times, window)  # distinct, since end - start <= window
                self.saved.append((layer, slots, cache.keys[layer][:, :, slots].clone(),
                                   cache.values[layer][:, :, slots].clone()))

    def restore_after(self, cache: KVCache, last_kept: int) -> None:
        """Put back the saved keys/values of the slots written for times after ``last_kept``."""
        undo = self.times > last_kept  # (n,)
        for layer, slots, keys, values in self.saved:
            cache.keys[layer][:, :, slots[undo]] = keys[:, :, undo]
            cache.values[layer][:, :, slots[undo]] = values[:, :, undo]


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampler with ``params`` draws from: logits (..., V) -> probs (..., V) fp32.

    Greedy is the one-hot distribution of the argmax, so the acceptance rule below reproduces greedy
    decoding exactly.
    """
    processed = process_logits(logits.reshape(-1, logits.shape[-1]), params).reshape(logits.shape)
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(processed, dim=-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                       generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """The rejection rule: p (k+1, V) target, q (k, V) draft distributions, drafts (k,) -> (accepted n, next token).

    The emitted tokens are drafts[:n] and then the next token: resampled from norm(max(0, p_n - q_n))
    at a rejection, or the bonus token drawn from p_k when all k were accepted.
    """
    for i, token in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if bool(u * q[i, token] < p[i, token]):  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    k = len(drafts)
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def _run_chunk(model: torch.nn.Module, cache: KVCache, tokens: Sequence[int], start: int) -> torch.Tensor:
    """Run tokens at times start.. (one row, no padding); logits of every position (n, V)."""
    device = cache.pad.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, n)
    positions = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)  # (1, n)
    return model(ids, positions=positions, kv_cache=cache.prefill_view(start, len(tokens)))[0]


class SpeculativeDecoder:
    """Generates with ``target`` while ``draft`` (same tokenizer, smaller) proposes ``draft_tokens`` per round."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, draft_tokens: int = 4):
        if draft_tokens < 1:
            raise UserError(f"--draft-tokens must be >= 1 (got {draft_tokens})")
        if draft.config.vocab_size != target.config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                            f"({target.config.vocab_size}); the two must share one tokenizer")
        windows = [w for m in (target, draft) for w in m.layer_windows if w is not None]
        if windows and draft_tokens + 1 > min(windows):
            raise UserError(f"--draft-tokens {draft_tokens} needs a sliding window of at least {draft_tokens + 1} "
                            f"(smallest window: {min(windows)})")
        self.target, self.draft, self.k = target.eval(), draft.eval(), draft_tokens
        self.stats = SpeculativeStats()

    @torch.inference_mode()
    def stream(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams = GREEDY,
               generator: Optional[torch.Generator] = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids, each as soon as it is decided."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if params.repetition_penalty != 1 or params.counts_tokens:
            raise UserError("speculative decoding does not support repetition, presence or frequency penalties")
        T, K = len(prompt), self.k
        caches = [KVCache.for_model(m, 1, T + max_new_tokens + K + 1) for m in (self.target, self.draft)]
        target_cache, draft_cache = caches
        self.caches = caches  # kept for inspection: after a generation they hold every time before the last token
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=target_cache.pad.device)
        p0 = probabilities(prefill(self.target, target_cache, ids)[0], params)
        prefill(self.draft, draft_cache, ids.to(draft_cache.pad.device))
        cur = int(torch.multinomial(p0, 1, generator=generator))
        yield cur
        emitted, t = 1, T  # cur sits at time t, in neither cache
        pending, pending_start = [cur], t  # tokens the draft has yet to run, from time pending_start
        while emitted < max_new_tokens:
            k = min(K, max_new_tokens - emitted - 1)
            drafts, q = self._propose(draft_cache, pending, pending_start, t, k, params, generator)
            snapshot = RingSnapshot(target_cache, t, t + k + 1)
            p = probabilities(_run_chunk(self.target, target_cache, [cur] + drafts, t), params)  # (k+1, V)
            n, token = accept_or_resample(p, q, drafts, generator)
            snapshot.restore_after(target_cache, t + n)
            self.stats.proposed += k
            self.stats.accepted += n
            self.stats.rounds += 1
            for new in drafts[:n] + [token]:
                if emitted < max_new_tokens:
                    yield new
                    emitted += 1
            if k == 0:  # the draft ran nothing this round
                pending = pending + [token]
            elif n == k:  # the draft never ran its last proposal
                pending, pending_start = [drafts[-1], token], t + k
            else:
                self._draft_snapshot.restore_after(draft_cache, t + n)
                pending, pending_start = [token], t + n + 1
            t, cur = t + n + 1, token
            self.draft_time = pending_start  # the draft cache holds the times before this one

    def _propose(self, cache: KVCache, pending: list[int], start: int, t: int, k: int, params: SamplingParams,
                 generator: Optional[torch.Generator]) -> tuple[list[int], torch.Tensor]:
        """Draft k tokens after the pending ones (the last of them at time t); (drafts, q (k, V))."""
        if k == 0:
            return [], torch.empty(0)
        self._draft_snapshot = RingSnapshot(cache, start, t + k)
        logits = _run_chunk(self.draft, cache, pending, start)[-1]
        drafts, qs = [], []
        for i in range(k):
            q = probabilities(logits, params)  # (V,)
            token = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator))
            drafts.append(token)
            qs.append(q)
            if i < k - 1:
                time = torch.tensor([t + i + 1], device=cache.pad.device)
                logits = decode_one_token(self.draft, cache, torch.tensor([[token]], device=cache.pad.device),
                                          time, read_len=t + i + 2)[0]
        return drafts, torch.stack(qs)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams = GREEDY,
                 generator: Optional[torch.Generator] = None, eos_ids: Iterable[int] = ()) -> list[int]:
        """New token ids, cut before the first EOS (which is left out)."""
        stop, out = set(eos_ids), []
        for token in self.stream(prompt, max_new_tokens, params, generator):
            if token in stop:
                break
            out.append(token)
        return out


def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, prompt: Sequence[int],
                         max_new_tokens: int, params: SamplingParams = GREEDY, draft_tokens: int = 4,
                         generator: Optional[torch.Generator] = None,
                         eos_ids: Iterable[int] = ()) -> tuple[list[int], SpeculativeStats]:
    """One-shot :meth:`SpeculativeDecoder.generate`; returns the tokens and the acceptance counters."""
    decoder = SpeculativeDecoder(target, draft, draft_tokens)
    tokens = decoder.generate(prompt, max_new_tokens, params, generator, eos_ids)
    return tokens, decoder.stats
