"""Side-by-side benchmarks against Hugging Face transformers (and tokenizers), on CPU or CUDA.

    for result in run_benchmarks(["train_dense", "decode"], device="cpu"):
        print(result.to_json())

Each case runs ours and the reference alternately in one process, on the same inputs, after
warm-up, and reports medians; ``ratio = ours / ref`` (see :mod:`.core`).
"""

from .core import H100_SXM_BF16_PEAK_FLOPS, Result, format_table, mfu, peak_memory_bytes, ratio, time_alternating
from .runner import CASES, DEFAULT_CASES, resolve_cases, resolve_device, run_benchmarks
from .sizes import Sizes, sizes_for

__all__ = ["CASES", "DEFAULT_CASES", "H100_SXM_BF16_PEAK_FLOPS", "Result", "Sizes", "format_table", "mfu",
           "peak_memory_bytes", "ratio", "resolve_cases", "resolve_device", "run_benchmarks", "sizes_for",
           "time_alternating"]
