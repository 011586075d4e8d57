"""Character-level tokenizer: standard library only, one id per character seen in training.

Ids 0-3 are the special tokens, then the corpus's characters in code-point order. A character that
was not in the training text encodes to ``<|unk|>``. Saved as a small JSON file with ``"type": "char"``.
The chat tokens ``<|im_start|>``/``<|im_end|>`` are not there after training (the vocabulary stays
nanoGPT's characters + 4); :meth:`CharTokenizer.with_chat_tokens` appends them after the characters,
and the file then lists them under ``"chat_tokens"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from ..errors import UserError
from .base import SPECIAL_TOKENS, Tokenizer
from .chat_template import CHAT_TOKENS, CHATML_TEMPLATE

FORMAT_VERSION = 1


class CharTokenizer(Tokenizer):
    """One token per Unicode character; unknown characters map to ``<|unk|>``."""

    kind = "char"
    line_splittable = True  # texts may be encoded in pieces: one id per character

    def __init__(self, chars: Sequence[str], chat_tokens: bool = False):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError("char tokenizer: 'chars' must be distinct single characters")
        self._n_chars = len(chars)
        self._chat = bool(chat_tokens)
        self._itos: List[str] = list(SPECIAL_TOKENS) + chars + (list(CHAT_TOKENS) if chat_tokens else [])
        self._stoi = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = range(len(SPECIAL_TOKENS))
        self._special = {t: i for i, t in enumerate(self._itos) if i < len(SPECIAL_TOKENS) or i >= self._first_chat}
        self._bytes = [b""] * len(SPECIAL_TOKENS) + [c.encode("utf-8", "surrogatepass") for c in chars]
        self._bytes += [b""] * (len(self._itos) - len(self._bytes))
        if chat_tokens:
            self._chat_template = CHATML_TEMPLATE
            self._end_of_turn_ids = (self._special[CHAT_TOKENS[1]],)

    @property
    def _first_chat(self) -> int:
        return len(SPECIAL_TOKENS) + self._n_chars

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
        return self._itos[len(SPECIAL_TOKENS):self._first_chat]

    def encode(self, text: str) -> List[int]:
        get, unk = self._stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[int]]:
        return self.encode(text), list(range(len(text)))

    def special_tokens(self) -> Dict[str, int]:
        return dict(self._special)

    def with_chat_tokens(self) -> "CharTokenizer":
        return self if self._chat else CharTokenizer(self.chars, chat_tokens=True)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        itos, n_special, first_chat = self._itos, len(SPECIAL_TOKENS), self._first_chat
        out = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= len(itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(itos)})")
            if n_special <= i < first_chat or not skip_special_tokens:
                out.append(itos[i])
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def to_json_str(self) -> str:
        data = {"type": "char", "version": FORMAT_VERSION, "special_tokens": list(SPECIAL_TOKENS),
                "chars": "".join(self.chars)}
        if self._chat:
            data["chat_tokens"] = list(CHAT_TOKENS)
        return json.dumps(data, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "CharTokenizer":
        """Rebuild from the parsed ``tokenizer.json`` (``path`` only names the file in errors)."""
        if data.get("special_tokens", list(SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise UserError(f"{path}: unexpected special tokens {data.get('special_tokens')}")
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise UserError(f"{path}: char tokenizer without a 'chars' string")
        chat = data.get("chat_tokens")
        if chat not in (None, list(CHAT_TOKENS)):
            raise UserError(f"{path}: unexpected chat tokens {chat}")
        return cls(list(chars), chat_tokens=chat is not None)
