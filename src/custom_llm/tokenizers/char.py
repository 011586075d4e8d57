"""Character-level tokenizer: standard library only, one id per character seen in training.

Ids 0-3 are the special tokens, then the corpus's characters in code-point order. A character that
was not in the training text encodes to ``<|unk|>``. Saved as a small JSON file with ``"type": "char"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Sequence

from ..errors import UserError
from .base import SPECIAL_TOKENS, Tokenizer

FORMAT_VERSION = 1


class CharTokenizer(Tokenizer):
    """One token per Unicode character; unknown characters map to ``<|unk|>``."""

    kind = "char"
    line_splittable = True  # texts may be encoded in pieces: one id per character

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError("char tokenizer: 'chars' must be distinct single characters")
        self._itos: List[str] = list(SPECIAL_TOKENS) + chars
        self._stoi = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = range(len(SPECIAL_TOKENS))
        self._bytes = [b""] * len(SPECIAL_TOKENS) + [c.encode("utf-8", "surrogatepass") for c in chars]

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Collect every distinct character of ``texts``."""
        seen: set = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def chars(self) -> List[str]:
        """The non-special characters, in id order."""
        return self._itos[len(SPECIAL_TOKENS):]

    def encode(self, text: str) -> List[int]:
        get, unk = self._stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        itos, n_special = self._itos, len(SPECIAL_TOKENS)
        out = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= len(itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(itos)})")
            if i >= n_special or not skip_special_tokens:
                out.append(itos[i])
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < len(SPECIAL_TOKENS):
            return b""
        return self._bytes[token_id]

    def to_json_str(self) -> str:
        return json.dumps({"type": "char", "version": FORMAT_VERSION, "special_tokens": list(SPECIAL_TOKENS),
                           "chars": "".join(self.chars)}, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "CharTokenizer":
        """Rebuild from the parsed ``tokenizer.json`` (``path`` only names the file in errors)."""
        if data.get("special_tokens", list(SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise UserError(f"{path}: unexpected special tokens {data.get('special_tokens')}")
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise UserError(f"{path}: char tokenizer without a 'chars' string")
        return cls(list(chars))
