"""The tokenizer interface shared by the byte-level BPE and the character tokenizer.

A tokenizer maps text to token ids and back. Both kinds register the same four special tokens, at ids
0-3 when they are trained here. Encoding treats the special tokens' text ("<|eos|>" in a corpus) as
ordinary text, so ``decode(encode(s)) == s`` for every Python string; special ids are inserted by the
data pipeline (EOS between documents) and by the chat template, never by ``encode``.

Chat: ``apply_chat_template(messages)`` renders a conversation with the tokenizer's Jinja template
(ChatML when it has the ``<|im_start|>``/``<|im_end|>`` tokens, an imported folder's own template, else
the plain fallback of ``chat_template.py``) and returns ids; ``stop_ids`` are the ids that end an answer.
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..fsutil import atomic_write
from .chat_template import PLAIN_TEMPLATE, RenderedChat, check_messages, render

_SURROGATES = re.compile("[\ud800-\udfff]")
_warned_surrogates = False


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes of a command-line argument, a broken string)
    replaced by U+FFFD, said once per process: the one rule for text no encoding can represent,
    applied by every tokenizer's ``encode`` (the same replacement ``--prompt-file`` applies to bytes)."""
    global _warned_surrogates
    if text.isascii() or not _SURROGATES.search(text):
        return text
    if not _warned_surrogates:
        _warned_surrogates = True
        logging.getLogger("custom_llm").warning("text holds characters that are not valid Unicode (lone "
                                                "surrogates, e.g. from undecodable bytes); encoded as U+FFFD")
    return _SURROGATES.sub("\ufffd", text)


BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)
TOKENIZER_FILE = "tokenizer.json"


class IncrementalDecoder:
    """Decode a stream of token ids one at a time, never emitting half of a multi-byte character.

    ``push(id)`` returns the text completed by that token (possibly ""), ``flush()`` whatever is left
    (incomplete bytes become U+FFFD, as in ``decode``). The concatenation of every ``push`` and the final
    ``flush`` equals ``decode(ids)``. Built from each token's bytes, so a push costs O(token length).
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text."""
        return self._utf8.decode(self._token_bytes(int(token_id)))

    def flush(self) -> str:
        """End the stream; return any pending text (a dangling partial character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class PrefixIncrementalDecoder(IncrementalDecoder):
    """Incremental decoding for tokenizers whose tokens are not raw bytes (e.g. imported HF files).

    Re-decodes the ids since the last emitted boundary and emits the new text once it no longer ends
    in U+FFFD, starting afresh after each newline (the approach of Hugging Face's ``TextStreamer``).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._pending: List[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self._decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        new = text[self._emitted:]
        self._emitted = len(text)
        if text.endswith("\n"):  # a line is complete: start afresh so the cost stays per line
            self._pending, self._emitted = [], 0
        return new

    def flush(self) -> str:
        text = self._decode(self._pending)[self._emitted:]
        self._pending, self._emitted = [], 0
        return text


class Tokenizer(ABC):
    """Base class: text <-> ids with special tokens bos/eos/pad/unk; saved as one ``tokenizer.json``."""

    kind: str = ""
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    unk_id: int = -1

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (the embedding rows a model needs)."""

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added)."""

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text; subclasses may use all cores."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes to ``decode`` (b"" for skipped special tokens)."""

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` for streaming generation output."""
        return IncrementalDecoder(self.token_bytes)

    @abstractmethod
    def to_json_str(self) -> str:
        """The content of ``tokenizer.json``."""

    def fingerprint(self) -> str:
        """A short hash of the serialized tokenizer: equal fingerprints encode identically."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = hashlib.sha256(self.to_json_str().encode("utf-8")).hexdigest()[:16]
            self._fingerprint = cached
        return cached

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically (temp file, fsync, rename); return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        atomic_write(path, self.to_json_str())
        return path

    def special_ids(self) -> dict:
        """The special token ids by role."""
        return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id}

    @abstractmethod
    def special_tokens(self) -> Dict[str, int]:
        """Every special token's text -> id (the ids ``decode`` skips; only templates produce them)."""

    @abstractmethod
    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[int]]:
        """``encode(text)`` and the character offset at which each token starts."""

    @abstractmethod
    def with_chat_tokens(self) -> "Tokenizer":
        """This tokenizer with ``<|im_start|>``/``<|im_end|>`` appended when missing (new ids at the end)."""

    # ----------------------------------------------------------------------------------------- chat
    @property
    def chat_template(self) -> Optional[str]:
        """The tokenizer's own Jinja chat template (None: :data:`PLAIN_TEMPLATE` is used instead)."""
        return getattr(self, "_chat_template", None)

    @property
    def end_of_turn_ids(self) -> Set[int]:
        """Ids that close an assistant turn besides end-of-sequence (ChatML's ``<|im_end|>``)."""
        return set(getattr(self, "_end_of_turn_ids", ()))

    @property
    def stop_ids(self) -> Set[int]:
        """End-of-sequence and end-of-turn ids: generation of an answer stops at any of them."""
        return ({self.eos_id} if self.eos_id >= 0 else set()) | self.end_of_turn_ids

    def template_variables(self) -> dict:
        """The variables a template sees besides ``messages`` (``bos_token``, ``eos_token``, ...)."""
        out = {}
        for role, token_id in self.special_ids().items():
            if token_id >= 0:
                out[f"{role}_token"] = self.decode([token_id], skip_special_tokens=False)
        return out

    def render_chat_parts(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
        """The rendered conversation with its generation spans and template-made special tokens."""
        problem = check_messages(messages)
        if problem is not None:
            raise ValueError(f"invalid chat messages: {problem}")
        return render(self.chat_template or PLAIN_TEMPLATE, messages, list(self.special_tokens()),
                      add_generation_prompt, **self.template_variables())

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text (for display: ``encode`` of it would not give the special ids)."""
        return self.render_chat_parts(messages, add_generation_prompt).text

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> List[int]:
        """Token ids of the rendered conversation; special ids come only from the template."""
        return self.chat_ids_and_mask(messages, add_generation_prompt)[0]

    def chat_ids_and_mask(self, messages: Sequence[dict],
                          add_generation_prompt: bool = False) -> Tuple[List[int], List[bool]]:
        """Ids of the conversation and, per token, whether it starts inside a ``{% generation %}`` block."""
        rendered = self.render_chat_parts(messages, add_generation_prompt)
        specials = self.special_tokens()
        ids: List[int] = []
        mask: List[bool] = []
        position = 0
        for offset, token in rendered.special_tokens + [(len(rendered.text), None)]:
            if offset > position:  # ordinary text between two template-made special tokens
                piece_ids, starts = self.encode_with_offsets(rendered.text[position:offset])
                ids += piece_ids
                mask += [rendered.in_generation(position + start) for start in starts]
            if token is not None:
                ids.append(specials[token])
                mask.append(rendered.in_generation(offset))
                position = offset + len(token)
        return ids, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def read_tokenizer_json(path: Path) -> dict:
    """Parse a tokenizer file, or raise a one-line error naming it."""
    from ..errors import UserError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable tokenizer file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a tokenizer file (expected a JSON object)")
    return data


def find_tokenizer_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else ``path/tokenizer.json``; a missing one is a user error."""
    from ..errors import UserError

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    return path


def optional_int(value: Optional[int]) -> int:
    """-1 for a token the tokenizer does not have."""
    return -1 if value is None else int(value)
