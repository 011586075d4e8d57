"""Tokenizers: byte-level BPE (Hugging Face ``tokenizers``) and a standard-library character tokenizer.

``train_tokenizer(texts, kind="auto")`` trains a BPE when ``tokenizers`` is importable and otherwise falls
back, with a one-line warning, to characters. ``load_tokenizer(path)`` reads either kind back from a
``tokenizer.json`` file or a directory holding one (a Hugging Face model folder included).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional

from ..errors import UserError
from .base import (BOS, EOS, PAD, SPECIAL_TOKENS, TOKENIZER_FILE, UNK, IncrementalDecoder, Tokenizer,
                   find_tokenizer_file, read_tokenizer_json)
from .char import CharTokenizer
from .chat_template import CHAT_TOKENS, CHATML_TEMPLATE, IM_END, IM_START, PLAIN_TEMPLATE

log = logging.getLogger(__name__)

KINDS = ("auto", "bpe", "char")


def bpe_available() -> bool:
    """True when Hugging Face ``tokenizers`` can be imported."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kind(kind: str) -> str:
    """"auto" becomes "bpe" when ``tokenizers`` is importable, else "char" (with a one-line warning)."""
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind != "auto":
        return kind
    if bpe_available():
        return "bpe"
    log.warning("the 'tokenizers' package is not installed: using the character tokenizer instead of BPE")
    return "char"


def train_tokenizer(texts: Iterable[str], kind: str = "auto", vocab_size: int = 8192, **bpe_options) -> Tokenizer:
    """Train a tokenizer of ``kind`` ("auto", "bpe" or "char") on ``texts``; ``vocab_size`` is for BPE only."""
    kind = resolve_kind(kind)
    if kind == "char":
        return CharTokenizer.train(texts)
    from .bpe import BPETokenizer

    return BPETokenizer.train(texts, vocab_size=vocab_size, **bpe_options)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (ours, char or BPE, or any HF tokenizers file) or a directory holding one."""
    file = find_tokenizer_file(path)
    data = read_tokenizer_json(file)
    if data.get("type") == "char":
        return CharTokenizer.from_json(data, file)
    from .bpe import BPETokenizer
    from .hf_roles import hf_chat_template, hf_end_of_turn_ids

    folder = file.parent
    return BPETokenizer.from_file(file, _special_roles(data, folder), hf_chat_template(folder),
                                  hf_end_of_turn_ids(folder))


def _special_roles(data: dict, folder: Path) -> Optional[dict]:
    """Our special tokens when the file has them, else the roles named by an HF ``tokenizer_config.json``."""
    added = {t.get("content") for t in data.get("added_tokens", []) if isinstance(t, dict)}
    if set(SPECIAL_TOKENS) <= added:
        return None
    from .hf_roles import hf_special_roles

    return hf_special_roles(added, folder)


__all__ = ["BOS", "EOS", "PAD", "UNK", "SPECIAL_TOKENS", "CHAT_TOKENS", "CHATML_TEMPLATE", "IM_END", "IM_START",
           "PLAIN_TEMPLATE", "TOKENIZER_FILE", "BPETokenizer", "CharTokenizer",
           "IncrementalDecoder", "Tokenizer", "bpe_available", "load_tokenizer", "resolve_kind",
           "train_tokenizer"]


def __getattr__(name):
    if name == "BPETokenizer":  # imported lazily so the package works without ``tokenizers``
        from .bpe import BPETokenizer

        return BPETokenizer
    raise AttributeError(name)
