"""From generated tokens to text deltas, on the engine's thread, and across to the event loop.

Each choice of a request gets a :class:`ChoiceStream`. Its ``on_token`` runs on the engine's worker
thread for every new token: it decodes incrementally (never half of a UTF-8 character), holds back
any tail that could be the start of a stop string, and hands finished text to the request's
``asyncio.Queue`` with ``loop.call_soon_threadsafe`` (the only way another thread may touch a
loop). Returning False when a stop string appears frees the slot on the spot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..generation.batch import GenerationRequest, TokenStep
from ..generation.streaming import StopStrings


@dataclass
class Event:
    """Text for one choice (and the tokens it came from), or that choice's end (``finish`` set)."""

    index: int
    text: str = ""
    steps: list[TokenStep] = field(default_factory=list)
    finish: Optional[str] = None
    """OpenAI's finish_reason ("stop", "length"), or "error"."""
    tokens: int = 0
    """At the end: how many tokens the choice generated."""


class ChoiceStream:
    """Detokenizes one choice's tokens and applies its stop strings; posts :class:`Event` objects."""

    def __init__(self, index: int, tokenizer, stops: list[str], post: Callable[[Event], None], metrics, start: float):
        self.index = index
        self.decoder = tokenizer.incremental_decoder()
        self.stops = StopStrings(stops)
        self.post = post
        self.metrics = metrics  # a serving.metrics.Metrics, or None
        self.last = start
        self.first = True
        self.pending: list[TokenStep] = []

    def on_token(self, step: TokenStep) -> bool:
        """Engine thread: one new token; False once a stop string has appeared."""
        now = time.perf_counter()
        if self.metrics is not None:
            (self.metrics.ttft if self.first else self.metrics.per_token).observe(now - self.last)
        self.first, self.last = False, now
        self.pending.append(step)
        text = self.stops.push(self.decoder.push(step.token))
        if text or self.stops.stopped:
            self.post(Event(self.index, text, self._take()))
        return not self.stops.stopped

    def on_finish(self, request: GenerationRequest) -> None:
        """Engine thread: the request ended; release held-back text and post the end."""
        reason = request.finish_reason
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(request.tokens))
        text = ""
        if not self.stops.stopped and reason in ("stop", "length"):
            text = self.stops.push(self.decoder.flush()) + self.stops.flush()
        finish = {"stop": "stop", "length": "length", "cancelled": "stop"}.get(reason, "error")
        self.post(Event(self.index, text, self._take(), finish=finish, tokens=len(request.tokens)))

    def _take(self) -> list[TokenStep]:
        steps, self.pending = self.pending, []
        return steps


def poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Event], None]:
    """A thread-safe ``post(event)`` into ``queue``, which belongs to ``loop``."""

    def post(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            pass

    return post


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes for log-probability listings (special tokens by their name)."""
    raw = tokenizer.token_bytes(token)
    if not raw:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, steps: list[TokenStep]) -> dict:
    """OpenAI chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    content = []
    for step in steps:
        text, raw = token_text(tokenizer, step.token)
        top = []
        for token, logprob in step.top_logprobs:
            t_text, t_raw = token_text(tokenizer, token)
            top.append({"token": t_text, "logprob": logprob, "bytes": t_raw})
        content.append({"token": text, "logprob": step.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, steps: list[TokenStep], offset: int) -> dict:
    """OpenAI completions ``logprobs``: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for step in steps:
        text, _ = token_text(tokenizer, step.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(step.logprob)
        out["top_logprobs"].append({token_text(tokenizer, t)[0]: lp for t, lp in step.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
