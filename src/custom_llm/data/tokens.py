"""Tokenize once into memory-mapped token files, cached by (tokenizer, corpus) fingerprints.

Layout under ``cache_dir/tokens/``: ``<key>.train.bin`` and ``<key>.val.bin`` hold the token ids
(uint16 when the vocabulary fits, else uint32; each document followed by EOS), and ``<key>.json``
records the tokenizer hash, the corpus fingerprints, token counts, dtype and a BLAKE2 checksum of each
file. The JSON header is written last (every file goes to a temporary name, is fsynced, then renamed),
so its presence means the token files are complete; a file whose size or checksum disagrees with the
header is rebuilt rather than used.

The corpus fingerprint hashes the documents' names and contents (BLAKE2b runs at ~1 GB/s, so ~0.03 s
for the 30 MB default corpus): a corpus copied elsewhere or touched without change reuses its cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..fsutil import atomic_open, atomic_write
from ..tokenizers import Tokenizer
from .sources import Document

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENCODE_CHUNK_CHARS = 4 << 20  # characters handed to one encode_batch call
PIECE_CHARS = 1 << 16  # long documents are cut at line starts into pieces of about this size


def default_cache_dir() -> Path:
    """``$CUSTOM_LLM_CACHE`` when set, else ``~/.cache/custom-llm``."""
    env = os.environ.get("CUSTOM_LLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "custom-llm"


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """A hash of the documents' names and texts, in order."""
    h = hashlib.blake2b(digest_size=16)
    for doc in docs:
        name, text = doc.name.encode("utf-8", "replace"), doc.text.encode("utf-8", "replace")
        h.update(len(name).to_bytes(8, "little") + name + len(text).to_bytes(8, "little"))
        h.update(text)
    return h.hexdigest()


def split_documents(docs: Sequence[Document], val_fraction: float = 0.05) -> Tuple[List[Document], List[Document]]:
    """Deterministic train/validation split by a hash of each document's name.

    A single document is cut at the line start nearest ``1 - val_fraction`` of its length (first part
    train, last part validation, as in nanoGPT). With several documents, when the hash sends none (or
    all) of them to validation, the one with the lowest (highest) hash moves over.
    """
    if not 0.0 <= val_fraction < 1.0:
        from ..errors import UserError

        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = list(docs)
    if val_fraction == 0 or not docs:
        return docs, []
    if len(docs) == 1:
        return _split_text(docs[0], val_fraction)
    keyed = sorted(((unit_hash(d.name), i) for i, d in enumerate(docs)))
    n_val = sum(1 for u, _ in keyed if u < val_fraction)
    n_val = min(max(n_val, 1), len(docs) - 1)
    val_idx = {i for _, i in keyed[:n_val]}
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document name."""
    digest = hashlib.blake2b(name.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _split_text(doc: Document, val_fraction: float) -> Tuple[List[Document], List[Document]]:
    text = doc.text
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > len(text) // 2:
        cut = newline + 1
    train, val = Document(doc.name + "#train", text[:cut]), Document(doc.name + "#val", text[cut:])
    return ([train] if train.text else []), ([val] if val.text else [])


@dataclass
class TokenDataset:
    """Token ids of the train and validation splits (1-D memory-mapped arrays) and their metadata."""

    train: np.ndarray
    val: np.ndarray
    meta: dict = field(default_factory=dict)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_token_dataset(train_docs: Sequence[Document], val_docs: Sequence[Document], tokenizer: Tokenizer,
                        cache_dir: Optional[os.PathLike] = None) -> TokenDataset:
    """Tokenize both splits into the cache (or reuse a valid cached copy) and memory-map them."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "tokens"
    fps = {"train": corpus_fingerprint(train_docs), "val": corpus_fingerprint(val_docs)}
    key = hashlib.blake2b(f"{FORMAT_VERSION}|{tokenizer.fingerprint()}|{fps['train']}|{fps['val']}".encode(),
                          digest_size=12).hexdigest()
    meta_path = folder / f"{key}.json"
    dataset = _open_cached(meta_path, key)
    if dataset is not None:
        log.debug("reusing cached tokens %s", meta_path)
        return dataset
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    meta = {"format": FORMAT_VERSION, "key": key, "tokenizer": tokenizer.fingerprint(), "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name, "corpus": fps}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        n_tokens, checksum = _write_tokens(folder / f"{key}.{split}.bin", docs, tokenizer, dtype)
        meta[f"{split}_tokens"], meta[f"{split}_checksum"] = n_tokens, checksum
        meta[f"{split}_documents"] = len(docs)
        meta[f"{split}_chars"] = sum(len(d.text) for d in docs)
    meta["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write(meta_path, json.dumps(meta, indent=1))
    log.info("tokenized %d train + %d val tokens in %.1fs -> %s", meta["train_tokens"], meta["val_tokens"],
             meta["seconds"], meta_path.parent)
    return TokenDataset(_memmap(folder / f"{key}.train.bin", dtype, meta["train_tokens"]),
                        _memmap(folder / f"{key}.val.bin", dtype, meta["val_tokens"]), meta)


def _open_cached(meta_path: Path, key: str) -> Optional[TokenDataset]:
    """The cached dataset when its header and files agree, else None (with a warning if it was broken)."""
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            raise ValueError("header does not match")
        arrays = {}
        for split in ("train", "val"):
            path = meta_path.with_name(f"{key}.{split}.bin")
            n = int(meta[f"{split}_tokens"])
            if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{path.name} is truncated or missing")
            if _file_checksum(path) != meta[f"{split}_checksum"]:
                raise ValueError(f"{path.name} fails its checksum")
            arrays[split] = _memmap(path, dtype, n)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        log.warning("token cache %s is unusable (%s): rebuilding it", meta_path, exc)
        return None
    return TokenDataset(arrays["train"], arrays["val"], meta)


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_tokens(path: Path, docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype) -> Tuple[int, str]:
    """Stream the ids of ``docs`` (each followed by EOS) into ``path`` atomically; return (count, checksum)."""
    h, total = hashlib.blake2b(digest_size=16), 0
    with atomic_open(path) as f:
        for ids in encode_documents(docs, tokenizer, dtype):
            data = ids.tobytes()
            f.write(data)
            h.update(data)
            total += len(ids)
    return total, h.hexdigest()


def encode_documents(docs: Sequence[Document], tokenizer: Tokenizer, dtype=np.uint32) -> Iterator[np.ndarray]:
    """Token ids of ``docs`` in order, each document followed by EOS, in chunks (batch-encoded on all cores)."""
    eos = tokenizer.eos_id
    splittable = getattr(tokenizer, "line_splittable", False)
    texts: List[str] = []
    ends: List[bool] = []  # True where a piece is the last of its document
    size = 0
    for doc in docs:
        pieces = split_at_lines(doc.text) if splittable else [doc.text]
        for j, piece in enumerate(pieces):
            texts.append(piece)
            ends.append(j == len(pieces) - 1)
            size += len(piece)
        if size >= ENCODE_CHUNK_CHARS:
            yield _join(tokenizer.encode_batch(texts), ends, eos, dtype)
            texts, ends, size = [], [], 0
    if texts:
        yield _join(tokenizer.encode_batch(texts), ends, eos, dtype)


def _join(encoded: List[List[int]], ends: List[bool], eos: int, dtype) -> np.ndarray:
    out = np.empty(sum(map(len, encoded)) + sum(ends), dtype=dtype)
    pos = 0
    for ids, end in zip(encoded, ends):
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        if end:
            out[pos] = eos
            pos += 1
    return out


def split_at_lines(text: str, size: int = PIECE_CHARS) -> List[str]:
    """Cut ``text`` into pieces of about ``size`` characters, only after a newline followed by printable ASCII.

    Our pre-tokenizer (GPT-2's regex) never joins a newline to a following non-space character, so
    encoding the pieces separately gives exactly the ids of the whole.
    """
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while True:
            cut = text.find("\n", cut)
            if cut < 0 or cut + 1 >= len(text) or "!" <= text[cut + 1] <= "~":
                break
            cut += 1
        if cut < 0 or cut + 1 >= len(text):
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces
