"""The generation engine: token ids in, token ids out (it knows nothing about tokenization).

Small functions in the style of gpt-fast: :func:`prefill` runs the prompt through the model and fills
the KV cache; :func:`decode_one_token` runs one new token; :func:`~.sampling.sample` picks the next
token. :class:`Engine` strings them together, keeps a cache per batch-size bucket for reuse and, on
CUDA, compiles the decode step with a static cache (``torch.compile(mode="reduce-overhead")``: CUDA
graphs; the compiled step itself lives in :mod:`.decode_step`). The readable reference,
:func:`generate_without_cache`, recomputes the whole sequence every step; tests hold the engine to it.

Prompts of different lengths are left-padded (see :mod:`.kv_cache` for the time/position scheme).

Legend: B batch (real rows), T prompt time, V vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from ..model.moe import GATHER_MAX_TOKENS_COMPILED
from .decode_step import CompiledDecodeStep, compile_static, decode_precision
from .kv_cache import KVCache
from .sampling import SamplingParams, sample

GREEDY = SamplingParams()


def prefill(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run tokens (B, T) at times start .. start + T - 1 through the model; logits of the last one (B, V)."""
    T = tokens.shape[1]
    times = torch.arange(start, start + T, device=tokens.device)  # (T,)
    positions = (times - cache.pad.unsqueeze(1)).clamp_min(0)  # (B, T): padding sits at position 0
    logits = model(tokens, positions=positions, kv_cache=cache.prefill_view(start, T), logits_to_keep=1)
    return logits[:, -1]


def decode_one_token(model: torch.nn.Module, cache: KVCache, token: torch.Tensor, time: torch.Tensor,
                     read_len: Optional[int] = None) -> torch.Tensor:
    """Run token (B, 1) at ``time`` ((1,) tensor); logits (B, V). Static shapes when ``read_len`` is None."""
    positions = (time - cache.pad).unsqueeze(1)  # (B, 1)
    return model(token, positions=positions, kv_cache=cache.decode_view(time, read_len))[:, -1]


def store_weights_transposed(model: torch.nn.Module) -> None:
    """Keep every ``nn.Linear`` weight (out, in) with column-major storage: same values, same shape.

    A batch-1 decode step is a chain of matrix-vector products that streams each weight from
    memory once. ``F.linear`` computes x @ W^T; with W stored column-major, W^T is a plain row-major
    (in, out) matrix, and CPU BLAS runs x @ (row-major matrix) as contiguous row updates that read
    memory about 1.7x faster than the per-row dot products it uses for the default layout (2-core
    CPU, d=384: 172 vs 302 us for a 1024x384 weight that is not in cache). Results agree to fp32
    rounding (the summation order changes); checkpoints are unaffected (saving makes tensors
    contiguous). A tied LM head is the embedding table, whose row lookups do not mind the layout.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in), strides (1, out)


def compile_decode_step(device: torch.device) -> Callable[..., torch.Tensor]:
    """:func:`decode_one_token`, compiled for static shapes: CUDA graphs on CUDA, frozen C++ on the CPU."""
    return compile_static(decode_one_token, device)


# Batch sizes up to this are rounded up to a power of two; larger ones to a multiple of it. It is the
# model's limit for compiled MoE decoding's static-shape path, so every bucket up to it takes that path.
BATCH_BUCKET_LIMIT = GATHER_MAX_TOKENS_COMPILED


def batch_bucket(batch_size: int) -> int:
    """The cache batch size a batch of ``batch_size`` rows runs in: 1, 2, 4, ..., 64, then multiples of 64."""
    if batch_size <= BATCH_BUCKET_LIMIT:
        return 1 << (batch_size - 1).bit_length()
    return -(-batch_size // BATCH_BUCKET_LIMIT) * BATCH_BUCKET_LIMIT


class Engine:
    """Generates from one model, reusing its KV caches (and compiled decode step) across calls.

    ``compile``: None (default) compiles the decode step on CUDA only; True/False forces it. The
    compiled step reads fixed-size cache buffers (``static_len`` slots for full-attention layers, by
    default the model's ``max_seq_len``), so it is traced once per cache shape and then replayed: as
    a CUDA graph on CUDA; on the CPU as inductor C++ code with the weights frozen into prepacked
    matrix-vector kernels (the weights must not change afterwards). Its lifecycle, the eager
    fallback when compiling fails and the guard skip are :class:`~.decode_step.CompiledDecodeStep`'s.

    ``prepare_model``: False (default) uses the model as given and never changes it; it must be in
    eval mode. True changes the caller's model in place for decoding speed: ``model.eval()`` and,
    on the CPU when not compiling, :func:`store_weights_transposed` (faster eager matrix-vector
    products). ``custom-llm generate`` and the decode benchmark pass True.

    Batch sizes: one cache per bucket of :func:`batch_bucket` (powers of two up to 64), kept for
    the engine's life. A batch is padded up to its bucket with dummy rows (a one-token prompt) whose
    outputs are dropped; sampling sees only the real rows, so each row's random stream is what it
    would be without padding. So a compiled step has at most seven graphs for batches up to 64 (under
    dynamo's default recompile limit of 8 per function, which engines of other models in the same
    process share), and a server whose batch sizes alternate replays them (CUDA graphs recorded once
    per bucket) instead of rebuilding a cache and recompiling at every change. The price is up to
    2x rows, cheap while decoding is bound by streaming the weights (small batches). Eager decoding
    uses the same buckets, for one rule and cache reuse.

    fp32 weights on CUDA decode with TF32 matmuls, only while the engine's own code runs
    (:func:`~.decode_step.decode_precision`).
    """

    def __init__(self, model: torch.nn.Module, *, compile: Optional[bool] = None, static_len: Optional[int] = None,
                 prepare_model: bool = False):
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.compile = self.device.type == "cuda" if compile is None else compile
        if prepare_model:
            model.eval()
            if self.device.type == "cpu" and not self.compile:
                store_weights_transposed(model)
        elif model.training:
            raise ValueError("Engine needs a model in eval mode (dropout, LayerDrop and noisy gating are for "
                             "training): call model.eval() first, or pass prepare_model=True")
        self.static_len = static_len or model.config.max_seq_len
        self.has_full_attention = any(w is None for w in model.layer_windows)
        self.caches: dict[int, KVCache] = {}  # batch bucket -> its cache
        self.cache: Optional[KVCache] = None  # the latest generation's cache
        self.step = CompiledDecodeStep(compile_decode_step(self.device), _eager_step) if self.compile else None
        # Inference tensors may not be updated outside inference mode, and compiled code runs the
        # cache updates itself: plain no_grad there.
        self._grad_mode = torch.no_grad if self.compile else torch.inference_mode

    def _cache_for(self, bucket: int, needed: int) -> KVCache:
        """The bucket's cache: the one it had when that fits (a new one would mean a new graph)."""
        cache = self.caches.get(bucket)
        if cache is None or (cache.has_full and cache.max_len < needed):
            length = max(needed, self.static_len) if self.compile else needed
            cache = self.caches[bucket] = KVCache.for_model(self.model, bucket, length)
        return cache

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams = GREEDY,
               generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,) on the model's device, ``max_new_tokens`` times.

        Nothing here waits for the device; the consumer decides when to look (and may stop early).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        return _each_step_within(self._running, self._stream(prompts, max_new_tokens, params, generator))

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """What holds while the engine's own code runs: its grad mode and, fp32 on CUDA, TF32 matmuls."""
        with self._grad_mode(), decode_precision(self.device, self.dtype):
            yield

    def _stream(self, prompts, max_new_tokens, params, generator):
        B, T = len(prompts), max(len(p) for p in prompts)
        rows = batch_bucket(B)  # B real rows, then dummy rows up to the bucket
        device = self.device
        pad = torch.full((rows,), T - 1, device=device)  # (rows,) a dummy row is one token 0
        pad[:B] = torch.tensor([T - len(p) for p in prompts], device=device)
        tokens = torch.zeros(rows, T, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        cache = self.cache = self._cache_for(rows, T + max_new_tokens)
        cache.reset(pad)
        seen = _seen_tokens(prompts, self.model.config.vocab_size, device) if params.repetition_penalty != 1 else None
        logits = prefill(self.model, cache, tokens)  # (rows, V)
        time = torch.full((1,), T, dtype=torch.long, device=device)
        step_tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # dummy rows keep feeding 0
        for step in range(max_new_tokens):
            token = sample(logits[:B], params, generator, seen)  # (B,)
            if seen is not None:
                seen.scatter_(1, token.unsqueeze(1), True)
            yield token
            if step == max_new_tokens - 1:
                break
            step_tokens[:B, 0] = token
            if self.step is not None:
                # From the second step on, the inputs repeat the first step's: its guards need no re-check.
                logits = self.step(self.model, cache, step_tokens, time, inputs_seen=step > 0)
            else:
                logits = decode_one_token(self.model, cache, step_tokens, time, read_len=T + step + 1)
            time += 1

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams = GREEDY,
                 generator: Optional[torch.Generator] = None, eos_ids: Iterable[int] = (),
                 check_every: int = 16) -> list[list[int]]:
        """New tokens per prompt, each list cut before its first EOS (the EOS itself left out).

        Generation ends after ``max_new_tokens`` or once every row has produced an EOS; that is
        checked every ``check_every`` steps, so the device is not waited on after each token.
        """
        eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        steps = []
        for i, token in enumerate(self.stream(prompts, max_new_tokens, params, generator)):
            steps.append(token)
            if eos.numel():
                finished |= torch.isin(token, eos)
                if (i + 1) % check_every == 0 and bool(finished.all()):
                    break
        rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]  # (B, N)
        stop = set(eos.tolist())
        return [_cut_at_eos(row, stop) for row in rows]


def _eager_step(model: torch.nn.Module, cache: KVCache, token: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """The compiled step's eager fallback: :func:`decode_one_token` reading only the written slots."""
    return decode_one_token(model, cache, token, time, read_len=int(time) + 1)


def _each_step_within(context: Callable[[], contextlib.AbstractContextManager], steps: Iterator) -> Iterator:
    """Run each resumption of the generator ``steps`` inside a fresh ``context()`` (grad mode, matmul
    precision), so those settings hold while the engine works and never leak into the caller's code."""
    try:
        while True:
            with context():
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        with context():
            steps.close()


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: SamplingParams = GREEDY, generator: Optional[torch.Generator] = None,
             eos_ids: Iterable[int] = (), compile: Optional[bool] = False) -> list[list[int]]:
    """One-shot :meth:`Engine.generate`, in eval mode (the model's mode is restored afterwards; its weights are
    left alone); no compilation unless asked: a compile pays off over many calls."""
    training = model.training
    model.eval()
    try:
        return Engine(model, compile=compile).generate(prompts, max_new_tokens, params, generator, eos_ids)
    finally:
        model.train(training)


@torch.inference_mode()
def generate_without_cache(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int,
                           params: SamplingParams = GREEDY, generator: Optional[torch.Generator] = None) -> list[int]:
    """The readable reference: a full forward over the whole sequence for every new token (one prompt)."""
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.embed_tokens.weight.device)  # (1, T)
    seen = _seen_tokens([prompt], model.config.vocab_size, ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1]  # (1, V)
        token = sample(logits, params, generator, seen)
        seen[0, token] = True
        ids = torch.cat((ids, token.view(1, 1)), dim=1)
    return ids[0, len(prompt):].tolist()


def _seen_tokens(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Bool (B, V): which tokens occur in each prompt (the repetition penalty's context)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, torch.tensor(list(p), dtype=torch.long, device=device)] = True
    return seen


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row
