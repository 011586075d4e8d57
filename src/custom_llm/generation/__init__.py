"""Generation outside the model: KV cache, samplers, the decode engine, and evaluation.

The engines (:class:`Engine` for one batch at a time, :class:`BatchEngine` for continuous batching of
many requests) take token ids and return token ids; tokenization, streaming text and stop strings
belong to the caller (the command line in :mod:`custom_llm.cli.generate`).
"""

from .batch import BatchEngine, GenerationRequest
from .generate import Engine, decode_one_token, generate, generate_without_cache, prefill
from .kv_cache import KVCache
from .sampling import (SamplingParams, apply_repetition_penalty, min_p_filter, process_logits, sample,
                       sample_from_logits, top_k_filter, top_p_filter)

__all__ = ["BatchEngine", "Engine", "GenerationRequest", "KVCache", "SamplingParams", "apply_repetition_penalty", "decode_one_token", "generate",
           "generate_without_cache", "min_p_filter", "prefill", "process_logits", "sample", "sample_from_logits",
           "top_k_filter", "top_p_filter"]
