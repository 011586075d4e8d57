"""Byte-level BPE through Hugging Face ``tokenizers`` (GPT-2 style; Sennrich et al. 2016, Radford et al. 2019).

The pipeline: GPT-2's regex pre-tokenizer with every run capped at ``MAX_PIECE`` characters, then bytes
mapped to printable characters (``ByteLevel``). The cap keeps BPE linear on pathological input (a 1 MB
line without spaces is one pre-token otherwise, and merging it is superlinear) and loses nothing: the
ByteLevel decoder concatenates token bytes, so any text round-trips exactly. The saved ``tokenizer.json``
is a standard file that ``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``
load as is.

Trained here, ids 0-3 are ``<|bos|> <|eos|> <|pad|> <|unk|>`` and ids 4-5 the ChatML tokens
``<|im_start|> <|im_end|>`` (free: the vocabulary is rounded up anyway), so every BPE model trained here
can be fine-tuned into a chat model without growing its embeddings. A file from elsewhere keeps its own
tokens, template and end-of-turn tokens (``chat_template`` and ``end_of_turn`` passed in by the loader).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ..errors import UserError
from ..fsutil import atomic_write
from .base import (BOS, EOS, PAD, SPECIAL_TOKENS, UNK, IncrementalDecoder, PrefixIncrementalDecoder, Tokenizer,
                   clean_text, optional_int, round_up)
from .chat_template import CHAT_TOKENS, CHATML_TEMPLATE, IM_END

# Special tokens that close a turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_NAMES = (IM_END, "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

log = logging.getLogger(__name__)

MAX_PIECE = 128  # longest run of one character class in a pre-token
# GPT-2's pre-tokenizer regex with every run capped at MAX_PIECE characters: one regex pass, and no
# pre-token long enough to make BPE merging slow. A capped run simply continues in the next piece.
PIECE_REGEX = (rf"'(?:s|t|re|ve|m|ll|d)| ?\p{{L}}{{1,{MAX_PIECE}}}| ?\p{{N}}{{1,{MAX_PIECE}}}"
               rf"| ?[^\s\p{{L}}\p{{N}}]{{1,{MAX_PIECE}}}|\s{{1,{MAX_PIECE}}}(?!\S)|\s{{1,{MAX_PIECE}}}")
VOCAB_MULTIPLE = 64


def _import_hf():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the 'tokenizers' package is not installed: pip install tokenizers, "
                        "or use the character tokenizer (--tokenizer char)") from None
    return tokenizers


def _byte_decoder() -> dict:
    """GPT-2's map from the printable stand-in characters back to the bytes they represent."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


class BPETokenizer(Tokenizer):
    """A wrapper over an HF ``tokenizers.Tokenizer``; trained here it is byte-level with our special tokens."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, special_tokens: Optional[dict] = None, chat_template: Optional[str] = None,
                 end_of_turn_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        if hasattr(self.hf, "encode_special_tokens"):
            self.hf.encode_special_tokens = True  # "<|eos|>" inside a text is text, not a special id
        roles = special_tokens or {"bos": BOS, "eos": EOS, "pad": PAD, "unk": UNK}
        self._roles = dict(roles)
        ids = {role: self.hf.token_to_id(tok) if tok else None for role, tok in roles.items()}
        self.bos_id, self.eos_id = optional_int(ids.get("bos")), optional_int(ids.get("eos"))
        self.pad_id, self.unk_id = optional_int(ids.get("pad")), optional_int(ids.get("unk"))
        self._vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self._special_ids = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self._special = set(self._special_ids)
        has_chatml = all(t in self._special_ids for t in CHAT_TOKENS)
        self._own_template = chat_template
        self._chat_template = chat_template or (CHATML_TEMPLATE if has_chatml else None)
        self._extra_end_of_turn = tuple(int(i) for i in end_of_turn_ids)
        named = (self._special_ids[t] for t in END_OF_TURN_NAMES if t in self._special_ids)
        self._end_of_turn_ids = tuple(sorted(set(named) | set(self._extra_end_of_turn)))
        self._byte_level = (json.loads(self.hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        self._bytes_cache: Optional[List[bytes]] = None
        # Our pipeline never merges across "\n" + printable ASCII, so long texts may be cut there.
        self.line_splittable = self._byte_level and json.dumps(PIECE_REGEX) in self.hf.to_str()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, round_to: int = VOCAB_MULTIPLE,
              min_frequency: int = 2, length: Optional[int] = None) -> "BPETokenizer":
        """Train a byte-level BPE of ``vocab_size`` tokens (rounded up to a multiple of ``round_to``)."""
        tk = _import_hf()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
        if vocab_size < minimum:
            raise UserError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least {minimum})")
        if round_to and vocab_size % round_to:
            rounded = round_up(vocab_size, round_to)
            log.info("vocab size %d rounded up to %d (a multiple of %d)", vocab_size, rounded, round_to)
            vocab_size = rounded
        hf = tk.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tk.Regex(PIECE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=list(SPECIAL_TOKENS) + list(CHAT_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer, length=length)
        return cls(hf)

    @classmethod
    def from_file(cls, path: Path, special_tokens: Optional[dict] = None, chat_template: Optional[str] = None,
                  end_of_turn_ids: Iterable[int] = ()) -> "BPETokenizer":
        """Load an HF ``tokenizer.json``."""
        tk = _import_hf()
        try:
            hf = tk.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise UserError(f"{path}: not a valid tokenizers file ({exc})") from None
        return cls(hf, special_tokens, chat_template, end_of_turn_ids)

    def special_tokens(self) -> dict:
        return dict(self._special_ids)

    def encode_with_offsets(self, text: str) -> tuple:
        encoding = self.hf.encode(clean_text(text), add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def with_chat_tokens(self) -> "BPETokenizer":
        missing = [t for t in CHAT_TOKENS if t not in self._special_ids]
        if not missing:
            return self
        tk = _import_hf()
        hf = tk.Tokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in missing])
        return BPETokenizer(hf, self._roles, self._own_template, self._extra_end_of_turn)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(clean_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode on all cores (the Rust side parallelises over texts)."""
        texts = [clean_text(t) for t in texts]
        fast = getattr(self.hf, "encode_batch_fast", None)  # no offsets: faster, same ids
        encodings = (fast or self.hf.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        if self._bytes_cache is None:
            self._bytes_cache = self._build_bytes_table()
        return self._bytes_cache[token_id]

    def _build_bytes_table(self) -> List[bytes]:
        to_byte = _byte_decoder()
        added = {t.content for t in self.hf.get_added_tokens_decoder().values() if not t.special}
        table = []
        for i in range(self._vocab_size):
            tok = self.hf.id_to_token(i)
            if tok is None or tok in self._special:
                table.append(b"")
            elif tok in added:  # added tokens are stored as plain text, not byte-level characters
                table.append(tok.encode("utf-8"))
            else:
                table.append(bytes(to_byte[c] for c in tok))
        return table

    def incremental_decoder(self) -> IncrementalDecoder:
        if self._byte_level:
            return IncrementalDecoder(self.token_bytes)
        return PrefixIncrementalDecoder(self.decode)

    def to_json_str(self) -> str:
        return self.hf.to_str()

    def save(self, directory) -> Path:
        """``tokenizer.json``, and for a tokenizer from elsewhere what its folder said besides: the roles and
        chat template (``tokenizer_config.json``) and extra end-of-turn ids (``generation_config.json``),
        so a checkpoint of an imported model keeps its chat format."""
        path = super().save(directory)
        ours = self._roles == {"bos": BOS, "eos": EOS, "pad": PAD, "unk": UNK}
        if ours and self._own_template is None and not self._extra_end_of_turn:
            return path
        config = {f"{role}_token": token for role, token in self._roles.items() if token}
        if self._own_template is not None:
            config["chat_template"] = self._own_template
        atomic_write(path.parent / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=1))
        if self._extra_end_of_turn:
            atomic_write(path.parent / "generation_config.json",
                         json.dumps({"eos_token_id": list(self._extra_end_of_turn)}, indent=1))
        return path
