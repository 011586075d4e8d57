"""Conversations for supervised fine-tuning: reading, validation, loss masks, packing, batches.

Sources: a JSONL file with one ``{"messages": [{"role", "content"}, ...]}`` object per line (OpenAI's
format; roles system / user / assistant), an ``hf:NAME[:CONFIG]`` dataset with a ``messages`` column,
or nothing: :func:`default_conversations`, questions about standard-library functions answered with
their signature and docstring, built from the default pre-training corpus without a download.

A conversation is valid when it is a non-empty list of messages with known roles and non-empty text,
an optional system message first, then user and assistant strictly alternating and ending with the
assistant; after tokenization it must fit the context. Invalid ones are counted per reason with their
line numbers (:class:`ChatReport`); a source without one valid conversation is a user error.

Loss masks come from the tokenizer's chat template, the rendering inference uses: a token is learned
when it lies in a ``{% generation %}`` block (the assistant's text and its end-of-turn token).

Packing puts several conversations into one row of ``T + 1`` tokens by best-fit decreasing (never
cutting one) and records a document id per token, so attention can stay inside each conversation;
positions a row does not fill are padding, which never enters the loss.

Legend: N rows, T sequence length.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError
from .chat_stdlib import default_conversations
from .sources import hf_train_split

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # targets the loss skips (the model's cross-entropy ignore_index)
PAD_DOCUMENT = -1  # document id of padding positions


@dataclass
class ChatReport:
    """How many conversations a source held, and which were dropped for what reason (line numbers)."""

    total: int = 0
    valid: int = 0
    invalid: Dict[str, List[int]] = field(default_factory=dict)

    def add_invalid(self, reason: str, line: int) -> None:
        """Count one dropped conversation."""
        self.invalid.setdefault(reason, []).append(line)

    def summary(self, shown: int = 8) -> str:
        """One line per reason: ``12 not alternating (lines 3, 7, ...)``."""
        lines = [f"{self.valid} of {self.total} conversations valid"]
        for reason, where in sorted(self.invalid.items()):
            listed = ", ".join(map(str, where[:shown])) + (", ..." if len(where) > shown else "")
            lines.append(f"  {len(where)} {reason} (lines {listed})")
        return "\n".join(lines)


def check_conversation(messages: Any) -> Optional[str]:
    """Why ``messages`` cannot be trained on (a short reason), or None when it is valid."""
    if not isinstance(messages, list):
        return "no 'messages' list"
    if not messages:
        return "empty conversation"
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return "unknown role"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return "empty message"
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != expected[:len(roles)] or roles[-1] != "assistant":
        return "not alternating"
    return None


def read_conversations(source: Optional[str]) -> Iterator[Tuple[int, Any]]:
    """(line number, messages or None for an unreadable line) from a JSONL file, ``hf:`` or the default set."""
    if not source:
        yield from enumerate(default_conversations(), start=1)
    elif source.startswith("hf:"):
        yield from enumerate(_hf_messages(source[3:]), start=1)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"conversation file not found: {source}")
        try:
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield number, _messages_of(line)
        except UnicodeDecodeError:
            raise UserError(f"{source}: not UTF-8 text (expected JSONL conversations)") from None


def _messages_of(line: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("messages") if isinstance(record, dict) else None


def _hf_messages(spec: str) -> List[Any]:
    """The ``messages`` column of a Hugging Face dataset's train split (a saved local folder works offline)."""
    return list(hf_train_split(spec, "messages")["messages"])


@dataclass
class TokenizedChat:
    """One conversation as token ids with its loss mask (True = learned) and its source line."""

    ids: np.ndarray  # (L,) int64
    mask: np.ndarray  # (L,) bool
    line: int


def tokenize_conversations(source: Optional[str], tokenizer: Any, max_len: int) -> Tuple[List[TokenizedChat],
                                                                                          ChatReport]:
    """Read, validate and tokenize ``source``; conversations over ``max_len`` tokens are dropped and counted."""
    report, out = ChatReport(), []
    for line, messages in read_conversations(source):
        report.total += 1
        reason = "not JSON with a 'messages' list" if messages is None else check_conversation(messages)
        if reason is None:
            ids, mask = tokenizer.chat_ids_and_mask(messages, add_generation_prompt=False)
            if len(ids) > max_len:
                reason = f"longer than the context ({max_len} tokens)"
            else:
                out.append(TokenizedChat(np.asarray(ids, np.int64), np.asarray(mask, bool), line))
        if reason is not None:
            report.add_invalid(reason, line)
    report.valid = len(out)
    where = source or "the default conversations"
    if report.invalid:
        log.warning("%s: %s", where, report.summary())
    if not out:
        raise UserError(f"{where}: no valid conversation ({report.summary().replace(chr(10), ';')})")
    return out, report


def pack(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins of at most ``capacity`` tokens.

    The longest item goes first, each into the fullest bin that still has room (a new bin when none
    has); items are never split. Deterministic (ties keep index order).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"item {i} of length {lengths[i]} exceeds the capacity {capacity}")
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, b))
    return bins


@dataclass
class ChatRows:
    """Fixed-width rows of ``T + 1`` tokens: ids, loss mask and document id per position (N, T + 1)."""

    ids: np.ndarray  # (N, T+1) int64
    mask: np.ndarray  # (N, T+1) bool, True where the token is learned
    documents: np.ndarray  # (N, T+1) int32, PAD_DOCUMENT on padding

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, document ids) for the given row indices, each (B, T); y is IGNORE_INDEX where not learned.

        A target is learned when its token is in the mask and belongs to the same conversation as the
        input before it (so no position predicts across a boundary, and padding is never a target).
        """
        ids, mask, docs = self.ids[rows], self.mask[rows], self.documents[rows]  # (B, T+1)
        x, y = ids[:, :-1], ids[:, 1:].copy()
        learned = mask[:, 1:] & (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] != PAD_DOCUMENT)
        y[~learned] = IGNORE_INDEX
        return np.ascontiguousarray(x), y, np.ascontiguousarray(docs[:, :-1])


def build_rows(chats: Sequence[TokenizedChat], seq_len: int, pad_id: int, packing: bool = True) -> ChatRows:
    """Rows of ``seq_len + 1`` tokens: packed by best fit, or one conversation per row when ``packing`` is off."""
    width = seq_len + 1
    if any(len(c.ids) > width for c in chats):
        raise ValueError(f"a conversation is longer than a row of {width} tokens")
    groups = pack([len(c.ids) for c in chats], width) if packing else [[i] for i in range(len(chats))]
    ids = np.full((len(groups), width), pad_id, np.int64)
    mask = np.zeros((len(groups), width), bool)
    docs = np.full((len(groups), width), PAD_DOCUMENT, np.int32)
    for r, group in enumerate(groups):
        at = 0
        for doc, i in enumerate(group):
            n = len(chats[i].ids)
            ids[r, at:at + n], mask[r, at:at + n], docs[r, at:at + n] = chats[i].ids, chats[i].mask, doc
            at += n
    return ChatRows(ids, mask, docs)


class ChatBatches:
    """Seeded epochs over the rows (a fresh permutation per epoch), B rows per step, exactly resumable."""

    def __init__(self, rows: ChatRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.seed = rows, int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def set_shape(self, batch_size: int, seq_len: int) -> None:
        """Rows per rank from the next batch on; ``seq_len`` must be the rows' (fixed when they were built)."""
        if seq_len != self.rows.ids.shape[1] - 1:
            raise ValueError(f"conversation rows hold {self.rows.ids.shape[1] - 1} tokens, not {seq_len}")
        self.batch_size = int(batch_size)

    @property
    def seq_len(self) -> int:
        """Tokens per row fed to the model (T)."""
        return self.rows.ids.shape[1] - 1

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The next (x, y, document ids, token weight); rank r takes its slice of the global ``world_size * B`` rows.

        Rows hold different numbers of learned tokens, so a mean per micro-batch (or per rank) would
        weigh tokens unequally. ``token weight`` (B, 1), the same in every row, is the global rows
        over the global learned tokens of this step: the loss module turns its micro-batch mean into
        this step's share of one mean over all learned tokens (see ``training/sft.py``).
        """
        need = self.batch_size * self.world_size
        picked = []
        while len(picked) < need:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(need - len(picked), len(self._order) - self.position)
            picked.extend(self._order[self.position:self.position + take])
            self.position += take
        learned = int((self.rows.batch(np.asarray(picked))[1] != IGNORE_INDEX).sum())
        mine = np.asarray(picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
        weight = np.full((len(mine), 1), need / max(learned, 1), np.float32)
        return (*self.rows.batch(mine), weight)

    def state_dict(self) -> dict:
        """JSON-serializable position: epoch and offset in its permutation."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state_dict`` was taken (same rows)."""
        if int(state["rows"]) != len(self.rows):
            raise UserError(f"the conversations changed since this run was saved ({state['rows']} rows then, "
                            f"{len(self.rows)} now)")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def split_conversations(chats: List[TokenizedChat], val_fraction: float) -> Tuple[List[TokenizedChat],
                                                                                   List[TokenizedChat]]:
    """(train, validation): every k-th conversation held out (none when fewer than 2)."""
    if val_fraction <= 0 or len(chats) < 2:
        return chats, []
    step = max(2, round(1 / val_fraction))
    return [c for i, c in enumerate(chats) if i % step != step - 1], chats[step - 1::step]
