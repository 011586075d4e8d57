"""One call from sources to (tokenizer, token dataset), with the trained tokenizer cached too."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError
from ..tokenizers import Tokenizer, load_tokenizer, resolve_kind, train_tokenizer
from ..tokenizers.base import TOKENIZER_FILE
from .sources import Document, load_documents
from .tokens import TokenDataset, unit_hash, build_token_dataset, corpus_fingerprint, default_cache_dir, split_documents

log = logging.getLogger(__name__)

# A BPE is trained on at most this many characters of the training split (a deterministic subset by
# name hash), which keeps a first run on the 30 MB default corpus short; the whole split is tokenized.
TOKENIZER_TRAIN_CHARS = 12_000_000


def tokenizer_training_subset(docs: Sequence[Document], max_chars: int = TOKENIZER_TRAIN_CHARS) -> List[Document]:
    """Documents in name-hash order until ``max_chars`` characters (all of them when they fit)."""
    if sum(len(d.text) for d in docs) <= max_chars:
        return list(docs)
    chosen, size = [], 0
    for doc in sorted(docs, key=lambda d: unit_hash(d.name)):
        if size >= max_chars:
            break
        chosen.append(doc)
        size += len(doc.text)
    return chosen


def cached_train_tokenizer(docs: Sequence[Document], kind: str = "auto", vocab_size: int = 8192,
                           cache_dir: Optional[os.PathLike] = None,
                           max_chars: int = TOKENIZER_TRAIN_CHARS) -> Tokenizer:
    """Train a tokenizer on ``docs``, or load the one trained before on the same corpus, kind and size."""
    kind = resolve_kind(kind)
    subset = tokenizer_training_subset(docs, max_chars) if kind == "bpe" else list(docs)
    key_text = f"{kind}|{vocab_size if kind == 'bpe' else 0}|{corpus_fingerprint(subset)}"
    key = hashlib.blake2b(key_text.encode(), digest_size=12).hexdigest()
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "tokenizers" / key
    if (folder / TOKENIZER_FILE).is_file():
        try:
            return load_tokenizer(folder)
        except UserError as exc:
            log.warning("cached tokenizer %s is unusable (%s): retraining", folder, exc)
    start = time.perf_counter()
    tokenizer = train_tokenizer((d.text for d in subset), kind=kind, vocab_size=vocab_size)
    log.info("trained a %s tokenizer (%d tokens) on %d documents in %.1fs", kind, tokenizer.vocab_size,
             len(subset), time.perf_counter() - start)
    tokenizer.save(folder)
    return tokenizer


def prepare_data(sources: Optional[Sequence[str]], *, tokenizer=None, tokenizer_kind: str = "auto",
                 vocab_size: int = 8192, cache_dir: Optional[os.PathLike] = None, val_fraction: float = 0.05,
                 text_field: str = "text", extensions=None, min_tokens: int = 0) -> Tuple[Tokenizer, TokenDataset]:
    """Load, split, (train a tokenizer unless one is given,) tokenize and cache; check the size.

    ``tokenizer`` may be a Tokenizer or a path to one. ``min_tokens`` is the fewest training tokens
    acceptable (pass ``seq_len + 1`` for one full window); fewer is a user error naming the sources.
    """
    docs = load_documents(sources, text_field=text_field, extensions=extensions)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if not train_docs:
        raise UserError(f"no training text left in {_describe(sources)} after the validation split")
    if tokenizer is None:
        tokenizer = cached_train_tokenizer(train_docs, tokenizer_kind, vocab_size, cache_dir)
    else:
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer_kind not in ("auto", tokenizer.kind):
            log.warning("--tokenizer %s is ignored: the run keeps the %s tokenizer of its weights (--init/--resume)",
                        tokenizer_kind, tokenizer.kind)
    dataset = build_token_dataset(train_docs, val_docs, tokenizer, cache_dir)
    _report_unknown(dataset, tokenizer)
    n = len(dataset.train)
    if n < min_tokens:
        raise UserError(f"{_describe(sources)} has {n} training tokens, fewer than one context window "
                        f"({min_tokens} tokens): add text or shorten the sequence length")
    dataset.meta["sources"] = [str(s) for s in sources] if sources else ["<default corpus>"]
    return tokenizer, dataset


def _report_unknown(dataset: TokenDataset, tokenizer: Tokenizer) -> None:
    """Say how many tokens became ``<|unk|>`` (a character tokenizer meeting characters it never saw)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or unk < 0:
        return
    counts = [int(np.count_nonzero(np.asarray(split) == unk)) for split in (dataset.train, dataset.val)]
    if sum(counts):
        log.warning("%d training and %d validation characters are not in the %s tokenizer's vocabulary and "
                    "became <|unk|> (characters first seen outside its training text)", counts[0], counts[1],
                    tokenizer.kind)


def _describe(sources: Optional[Sequence[str]]) -> str:
    if not sources:
        return "the default corpus"
    return ", ".join(map(str, sources)) if len(sources) <= 3 else f"{sources[0]} (+{len(sources) - 1} more)"
