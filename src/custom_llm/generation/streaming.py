"""Text-level helpers for streaming generation: stop strings and the context-length policy.

They work on strings and lengths only (no tokenizer, no model), so the command line can stream
decoded text and the rules can be tested on their own.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import UserError


class StopStrings:
    """Passes streamed text through, holding back any tail that could be the start of a stop string.

    ``push(text)`` returns what is safe to show; once a stop string appears, ``stopped`` is True and
    the text before it is the last output (the stop string itself is not shown).
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._buffer = ""

    def push(self, text: str) -> str:
        """Add newly decoded text; return the part that can no longer belong to a stop string."""
        if self.stopped:
            return ""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out
        found = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self._buffer, self.stopped = self._buffer[:min(found)], "", True
            return out
        keep = self._partial_tail()
        out, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return out

    def flush(self) -> str:
        """End of generation: release what was held back."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out

    def _partial_tail(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        longest = min(len(self._buffer), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = self._buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def fit_to_context(prompt_len: int, max_new_tokens: int, max_seq_len: int,
                   has_full_attention: bool) -> tuple[int, Optional[str]]:
    """The documented context policy: (new tokens to generate, a notice for the user or None).

    * A prompt longer than ``max_seq_len`` tokens is an error: the model never saw such contexts,
      and silently dropping text would hide that from the user.
    * With any full-attention layer, prompt + new tokens stop at ``max_seq_len`` (those layers'
      cache holds that many keys, and positions past it are untrained): ``max_new_tokens`` is
      capped, with a notice.
    * A model whose layers all use sliding windows keeps bounded memory, so it may generate past
      ``max_seq_len`` (every query still sees at most W keys, as in training).
    """
    if prompt_len > max_seq_len:
        raise UserError(f"the prompt is {prompt_len} tokens, longer than the model's context of {max_seq_len} "
                        "tokens (max_seq_len); shorten it")
    if not has_full_attention or prompt_len + max_new_tokens <= max_seq_len:
        return max_new_tokens, None
    room = max_seq_len - prompt_len
    if room <= 0:
        raise UserError(f"the prompt is {prompt_len} tokens and fills the model's context of {max_seq_len} "
                        "tokens (max_seq_len): no room to generate; shorten it")
    return room, (f"note: generating at most {room} new token{'s' if room > 1 else ''}: the prompt ({prompt_len} tokens) plus new tokens "
                  f"must fit the model's context of {max_seq_len} tokens (max_seq_len)")
