"""Tokenization throughput through this package against calling Hugging Face ``tokenizers`` directly."""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

from ..tokenizers import Tokenizer
from .sources import Document
from .tokens import ENCODE_CHUNK_CHARS, encode_documents, token_dtype


def _batches(docs: Sequence[Document], chunk_chars: int) -> List[List[str]]:
    batches, batch, size = [], [], 0
    for doc in docs:
        batch.append(doc.text)
        size += len(doc.text)
        if size >= chunk_chars:
            batches.append(batch)
            batch, size = [], 0
    return batches + ([batch] if batch else [])


def tokenization_throughput(tokenizer: Tokenizer, docs: Sequence[Document], repeats: int = 1,
                            chunk_chars: int = ENCODE_CHUNK_CHARS) -> dict:
    """MB/s of :func:`encode_documents` (ours: ids into a numpy token stream) and of the bare HF call.

    The reference hands the same documents to ``tokenizers.Tokenizer.encode_batch`` in batches of
    about ``chunk_chars`` characters and collects ``.ids``. Best of ``repeats``; ratio = ours / ref.
    """
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    dtype = token_dtype(tokenizer.vocab_size)
    ours = _best(lambda: sum(len(a) for a in encode_documents(docs, tokenizer, dtype)), repeats)
    ref: Optional[float] = None
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        batches = _batches(docs, chunk_chars)
        ref = _best(lambda: sum(len(e.ids) for b in batches for e in hf.encode_batch(b, add_special_tokens=False)),
                    repeats)
    result = {"megabytes": round(mb, 3), "ours_mb_s": mb / ours, "ref_mb_s": mb / ref if ref else None}
    result["ratio"] = result["ours_mb_s"] / result["ref_mb_s"] if ref else None
    return result


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

