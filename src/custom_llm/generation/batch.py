"""Continuous batching: many generation requests share one model and one preallocated KV cache.

The slot design of llama.cpp's server, with the iteration-level scheduling of Orca (Yu et al. 2022):
the cache (:class:`~.kv_cache.SlotKVCache`) has ``max_batch`` rows, the *slots*. Each call of
:meth:`BatchEngine.step`

1. admits queued requests into free slots: the prompt is prefilled alone into its slot's row and the
   first token sampled (so a new request never waits for the others to finish);
2. runs one batched decode step for every active slot, each at its own time (position), with its own
   sampling parameters and its own ``torch.Generator``;
3. frees a slot the moment its request ends: a stop id (end of sequence / end of turn), its token
   limit, its ``on_token`` callback returning False (a stop string, say), or a cancellation.

A seeded request draws only from its own generator, so it gives the same tokens alone or beside
others (up to the float rounding of a batched matrix product). Nothing here knows about text or
HTTP: token ids go in, and every token comes out through callbacks that run on the engine's thread.
:meth:`BatchEngine.generate_batch` is the plain blocking use; :meth:`BatchEngine.start` runs the
scheduler on a background thread for a server.

Legend: S slots (max_batch), V vocabulary, T prompt time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from .decode_step import CompiledDecodeStep
from .generate import GREEDY, compile_decode_step, decode_one_token, prefill, store_weights_transposed
from .kv_cache import SlotKVCache
from .sampling import SamplingParams, sample, token_logprobs

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class TokenStep:
    """One generated token, with its log-probabilities when the request asked for them."""

    token: int
    logprob: Optional[float] = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """(token id, log-probability) of the most likely tokens, most likely first."""


class QueueFull(Exception):
    """The engine's queue already holds ``max_queue`` requests."""


class GenerationRequest:
    """One generation job: prompt ids, limits and sampling, and callbacks run on the engine's thread.

    ``on_token(step)`` sees every generated token (stop ids excluded); returning False ends the
    request with reason "stop". ``on_finish(request)`` runs once at the end, with ``finish_reason``
    one of :data:`FINISH_REASONS`. ``logprobs``: None for none, else how many top alternatives to add.
    """

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams = GREEDY, *,
                 seed: Optional[int] = None, stop_ids: Iterable[int] = (), logprobs: Optional[int] = None,
                 on_token: Optional[Callable[[TokenStep], Optional[bool]]] = None,
                 on_finish: Optional[Callable[["GenerationRequest"], None]] = None):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.seed = seed
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.logprobs = logprobs
        self.on_token = on_token
        self.on_finish = on_finish
        self.tokens: list[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.cancelled = False


@dataclass
class _Slot:
    """What the scheduler keeps for an active request."""

    request: GenerationRequest
    time: int  # the time (position) at which ``last`` is written by the next decode step
    generator: torch.Generator
    seen: Optional[torch.Tensor]  # (1, V) bool: context tokens, for the repetition penalty
    counts: Optional[torch.Tensor]  # (1, V) float: generated-token counts, for presence/frequency penalties
    last: int = 0


class BatchEngine:
    """A continuous-batching generator over ``max_batch`` slots of one preallocated KV cache.

    ``compile``: None (default) compiles the batched decode step on CUDA only (CUDA graphs through
    :func:`~.generate.compile_decode_step`); a compiled step always runs all ``max_batch`` rows and
    reads the whole cache, so it is traced once. Eagerly, a step runs rows 0 .. highest active slot
    and reads the cache up to the latest time (free slots are taken lowest first, so the batch stays
    short). ``max_queue`` bounds the requests waiting while every slot is busy (:class:`QueueFull` beyond it).
    """

    def __init__(self, model: torch.nn.Module, max_batch: int = 8, max_queue: int = 64, *,
                 compile: Optional[bool] = None, transpose_weights: Optional[bool] = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.compile = self.device.type == "cuda" if compile is None else compile
        if (self.device.type == "cpu" and not self.compile) if transpose_weights is None else transpose_weights:
            store_weights_transposed(model)
        self.max_len = model.config.max_seq_len
        # Full-attention layers hold max_len keys (a window that covers max_len is stored as full).
        self.bounded = any(w is None or w >= self.max_len for w in model.layer_windows)
        self.slots: list[Optional[_Slot]] = [None] * max_batch
        self.cache: Optional[SlotKVCache] = None
        self.decode_steps = 0
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._step: Optional[CompiledDecodeStep] = None
        if self.compile:  # on a failure to compile it warns once and runs the eager function: see _decode
            self._step = CompiledDecodeStep(compile_decode_step(self.device), decode_one_token)
        self._grad_mode = torch.no_grad if self.compile else torch.inference_mode

    # ----- submitting -------------------------------------------------------------------------

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError unless a prompt of this length and this many new tokens fit a slot."""
        if prompt_len < 1:
            raise ValueError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if prompt_len > self.max_len or (self.bounded and prompt_len + max_new_tokens > self.max_len):
            raise ValueError(f"the prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens exceed the "
                             f"model's context of {self.max_len} tokens")

    def submit(self, request: GenerationRequest, *, force: bool = False) -> GenerationRequest:
        """Queue a request (ValueError if it cannot fit; :class:`QueueFull` past ``max_queue`` unless ``force``)."""
        self.check(len(request.prompt), request.max_new_tokens)
        with self._cond:
            free = self.max_batch - self.active_slots  # queued requests that a free slot takes at the next step
            if not force and len(self._queue) >= self.max_queue + free:
                raise QueueFull(f"{self.max_batch} requests are generating and {len(self._queue)} waiting "
                                f"(max_queue={self.max_queue})")
            self._queue.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Stop a request: dropped at once if still queued, its slot freed at the next step otherwise."""
        with self._cond:
            request.cancelled = True
            if request in self._queue:
                self._queue.remove(request)
                queued = True
            else:
                queued = False
            self._cond.notify()
        if queued:
            self._finish(request, "cancelled")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        """Slots holding a request."""
        return sum(s is not None for s in self.slots)

    # ----- running ------------------------------------------------------------------------------

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       params: SamplingParams | Sequence[SamplingParams] = GREEDY,
                       seeds: Optional[Sequence[Optional[int]]] = None, stop_ids: Iterable[int] = ()) -> list[list[int]]:
        """New tokens per prompt (stop ids left out), all prompts scheduled through the slots."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        stop_ids = tuple(stop_ids)
        requests = [self.submit(GenerationRequest(p, max_new_tokens, sp, seed=s, stop_ids=stop_ids), force=True)
                    for p, sp, s in zip(prompts, params_list, seeds)]
        if self._thread is None:
            while not all(r.done.is_set() for r in requests):
                self.step()
        for r in requests:
            r.done.wait()
            if r.error is not None:
                raise r.error
        return [r.tokens for r in requests]

    def start(self) -> "BatchEngine":
        """Run the scheduler on a background thread (the model never runs on the caller's thread)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="custom-llm-batch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current step; queued and active requests are cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [*self._queue, *(s.request for s in self.slots if s is not None)]:
            self._finish(request, "cancelled")
        self._queue.clear()
        self.slots = [None] * self.max_batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and self.active_slots == 0:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a bug: fail what is in the slots, keep the thread alive
                log.exception("batch engine step failed")
                for b, slot in enumerate(self.slots):
                    if slot is not None:
                        self._free(b, "error", error)

    def step(self) -> bool:
        """Admit queued requests into free slots, then one decode step; False when there was nothing to do."""
        with self._grad_mode():
            for b, slot in enumerate(self.slots):
                if slot is not None and slot.request.cancelled:
                    self._free(b, "cancelled")
            self._admit()
            active = [b for b, s in enumerate(self.slots) if s is not None]
            if not active:
                return False
            try:
                logits = self._decode(active)  # (n, V)
            except Exception as error:  # noqa: BLE001 - fail the batch's requests, keep the engine serving
                log.exception("decode step failed")
                for b in active:
                    self._free(b, "error", error)
                return True
            self.decode_steps += 1
            for b in active:
                self.slots[b].time += 1
                self._emit(b, logits[b:b + 1])
        return True

    def _cache(self) -> SlotKVCache:
        if self.cache is None:
            config, weight = self.model.config, self.model.embed_tokens.weight
            self.cache = SlotKVCache(self.model.layer_windows, self.max_batch, self.max_len, config.n_kv_heads,
                                     config.resolved_head_dim, device=self.device, dtype=weight.dtype)
        return self.cache

    def _admit(self) -> None:
        """Prefill queued requests into free slots (lowest first), sampling each one's first token."""
        while True:
            with self._cond:
                free = next((b for b, s in enumerate(self.slots) if s is None), None)
                if free is None or not self._queue:
                    return
                request = self._queue.popleft()
            try:
                self._prefill(free, request)
            except Exception as error:  # noqa: BLE001 - this request fails, the others go on
                log.exception("prefill failed")
                self.slots[free] = None
                self._finish(request, "error", error)

    def _prefill(self, b: int, request: GenerationRequest) -> None:
        cache = self._cache()
        cache.pad[b] = 0
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=self.device)  # (1, T)
        logits = prefill(self.model, cache.rows(b, b + 1), prompt)  # (1, V)
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        params, vocab = request.params, self.model.config.vocab_size
        seen = None
        if params.repetition_penalty != 1:
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=self.device)
            seen[0, prompt[0]] = True
        counts = torch.zeros(1, vocab, device=self.device) if params.counts_tokens else None
        self.slots[b] = _Slot(request, len(request.prompt), generator, seen, counts)
        self._emit(b, logits)

    def _decode(self, active: list[int]) -> torch.Tensor:
        """One forward of rows 0 .. n - 1 (all rows when compiled), each at its slot's time; logits (n, V)."""
        cache = self._cache()
        n = self.max_batch if self._step is not None else active[-1] + 1
        rows = self.slots[:n]
        tokens = torch.tensor([[s.last if s else 0] for s in rows], dtype=torch.long, device=self.device)  # (n, 1)
        times = [s.time if s else 0 for s in rows]
        time = torch.tensor(times, dtype=torch.long, device=self.device)  # (n,)
        if self._step is not None:
            # Every compiled call has the same cache tensors and shapes, so after the first one the
            # step may skip dynamo's guards (see CompiledDecodeStep).
            logits = self._step(self.model, cache, tokens, time, inputs_seen=self.decode_steps > 0)
            if self._step.state == "eager":  # compiling failed: from now on the eager path below
                self._step = None
            return logits
        read_len = max(times) + 1 if self.bounded else None
        return decode_one_token(self.model, cache.rows(0, n), tokens, time, read_len)

    def _emit(self, b: int, logits: torch.Tensor) -> None:
        """Sample slot b's next token from logits (1, V), hand it to the request, free the slot when done."""
        slot = self.slots[b]
        request = slot.request
        if request.cancelled:
            self._free(b, "cancelled")
            return
        params = request.params
        token = sample(logits, params, slot.generator, slot.seen, slot.counts)  # (1,)
        step = TokenStep(int(token))
        if request.logprobs is not None:
            chosen, values, ids = token_logprobs(logits, token, request.logprobs)
            step.logprob = float(chosen)
            step.top_logprobs = list(zip(ids[0].tolist(), values[0].tolist()))
        slot.last = step.token
        if slot.seen is not None:
            slot.seen[0, step.token] = True
        if slot.counts is not None:
            slot.counts[0, step.token] += 1
        if step.token in request.stop_ids:
            self._free(b, "stop")
            return
        request.tokens.append(step.token)
        try:
            keep = request.on_token(step) if request.on_token is not None else None
        except Exception as error:  # noqa: BLE001 - a failing consumer ends its own request only
            log.exception("on_token callback failed")
            self._free(b, "error", error)
            return
        if keep is False:
            self._free(b, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._free(b, "length")

    def _free(self, b: int, reason: str, error: Optional[BaseException] = None) -> None:
        slot, self.slots[b] = self.slots[b], None
        self._finish(slot.request, reason, error)

    def _finish(self, request: GenerationRequest, reason: str, error: Optional[BaseException] = None) -> None:
        if request.done.is_set():
            return
        request.finish_reason, request.error = reason, error
        if request.on_finish is not None:
            try:
                request.on_finish(request)
            except Exception:  # noqa: BLE001
                log.exception("on_finish callback failed")
        request.done.set()
