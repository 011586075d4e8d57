"""Tokenization throughput: our pipeline against calling Hugging Face ``tokenizers`` directly.

A byte-level BPE is trained (untimed) on a slice of the default corpus; then the same documents are
turned into token ids by :func:`custom_llm.data.encode_documents` (ours: ids plus EOS in a numpy
stream, the way the data pipeline tokenizes) and by the bare ``tokenizers.Tokenizer.encode_batch`` on
whole documents in batches of the same size, collecting ``.ids`` (the reference). Unit: MB of UTF-8
text per second.
"""

from __future__ import annotations

import torch

from .context import Context
from .core import Result, median, paired_ratio, time_alternating


def _corpus_slice(chars: int) -> list:
    """The first documents of the default corpus holding about ``chars`` characters."""
    from ..data import default_corpus_documents

    docs, size = [], 0
    for doc in default_corpus_documents():
        docs.append(doc)
        size += len(doc.text)
        if size >= chars:
            break
    return docs


def _batches(texts: list[str], chunk_chars: int) -> list[list[str]]:
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chunk_chars:
            batches.append(batch)
            batch, size = [], 0
    return batches + ([batch] if batch else [])


def tokenize(ctx: Context) -> Result:
    """MB/s of our tokenization pipeline against HF tokenizers' encode_batch."""
    from ..data import encode_documents, token_dtype
    from ..data.tokens import ENCODE_CHUNK_CHARS
    from ..tokenizers import train_tokenizer

    s = ctx.sizes
    docs = _corpus_slice(s.tokenize_chars)
    texts = [d.text for d in docs]
    tokenizer = train_tokenizer(texts, kind="auto", vocab_size=s.tokenizer_vocab)
    dtype = token_dtype(tokenizer.vocab_size)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    counts: dict[str, int] = {}

    def ours() -> None:
        counts["ours"] = sum(len(a) for a in encode_documents(docs, tokenizer, dtype))

    runs = {"ours": ours}
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        batches = _batches(texts, ENCODE_CHUNK_CHARS)

        def ref() -> None:
            counts["ref"] = sum(len(e.ids) for b in batches for e in hf.encode_batch(b, add_special_tokens=False))

        runs["ref"] = ref
    times = time_alternating(runs, torch.device("cpu"), s.repeats, s.warmup)
    config = {"megabytes": round(megabytes, 3), "documents": len(docs), "tokenizer": tokenizer.kind,
              "vocab_size": tokenizer.vocab_size, "tokens": counts,
              "ours": "data.encode_documents (ids + EOS per document into numpy)",
              "ref": None if hf is None else "tokenizers.Tokenizer.encode_batch(...).ids",
              "run_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "paired_ratio": paired_ratio(times), "higher_is_better": True}
    ref_mbs = megabytes / median(times["ref"]) if "ref" in times else None
    return Result("tokenize", megabytes / median(times["ours"]), ref_mbs, "MB/s", "cpu", config)
