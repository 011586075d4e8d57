"""``custom-llm chat``: a conversation with a chat model in the terminal.

Every turn renders the whole history with the tokenizer's chat template (ChatML for models fine-tuned
here, an imported model's own template, else the plain fallback) into ids, exactly as ``serve`` does,
and streams the answer until one of ``tokenizer.stop_ids`` (end of turn or end of sequence). When the
history outgrows the context, the oldest exchanges are left out of the prompt (the system message
stays). Ctrl-C stops the current answer (what was shown stays in the history) and the session goes on;
Ctrl-D or ``/quit`` leaves. With standard input that is not a terminal every line is one user message
and only the answers are written to standard output, one after another, for scripting.
"""

from __future__ import annotations

import sys
from typing import Iterator, List, Optional

from ..errors import UserError

HELP = """commands:
  /reset              forget the conversation (the system message stays)
  /system TEXT        set the system message (empty TEXT removes it) and start over
  /settings [K=V ...] show or change temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens
  /help               this list
  /quit               leave (Ctrl-D too); Ctrl-C stops an answer"""
SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


def register(sub) -> None:
    """Add the ``chat`` sub-command."""
    from .generate import add_model_args, add_sampling_args

    chat = sub.add_parser("chat", help="chat with a model in the terminal",
                          description="An interactive conversation with streamed answers (commands: /reset, "
                                      "/system TEXT, /settings, /help, /quit; Ctrl-C stops an answer). Standard "
                                      "input that is not a terminal gives one user message per line.")
    add_model_args(chat)
    chat.add_argument("--system", default=None, help="system message to start with")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="tokens per answer at most (default 512)")
    add_sampling_args(chat, temperature=0.7)
    chat.add_argument("--seed", type=int, default=0, help="random seed (a scripted session is reproducible)")
    chat.set_defaults(func=run_chat)


class ChatSession:
    """A conversation with one model: history, settings, and one streamed answer at a time."""

    def __init__(self, engine, tokenizer, settings: dict, system: Optional[str] = None, seed: int = 0):
        import torch

        self.engine, self.tokenizer = engine, tokenizer
        self.settings = dict(settings)
        self.params = self._sampling(self.settings)
        self.system = system or None
        self.history: List[dict] = []
        self.generator = torch.Generator(device=engine.device).manual_seed(seed)

    @staticmethod
    def _sampling(settings: dict):
        from ..generation.sampling import SamplingParams

        try:
            params = SamplingParams(**{k: v for k, v in settings.items() if k != "max_new_tokens"})
        except (TypeError, ValueError) as exc:
            raise UserError(str(exc)) from None
        if settings["max_new_tokens"] < 1:
            raise UserError(f"max_new_tokens must be >= 1 (got {settings['max_new_tokens']})")
        return params

    def command(self, line: str) -> Optional[str]:
        """Run a ``/command``; returns what to show (None: the line was a message, not a command)."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            raise EOFError
        if name == "/reset":
            self.history = []
            return "(conversation cleared)"
        if name == "/system":
            self.system, self.history = rest.strip() or None, []
            return f"(system message {'set' if self.system else 'removed'}; conversation cleared)"
        if name == "/settings":
            return self._change_settings(rest.split())
        if name == "/help":
            return HELP
        if name.startswith("/") and name[1:].isalpha():
            return f"unknown command {name} (/help lists them)"
        return None

    def _change_settings(self, pairs: List[str]) -> str:
        new = dict(self.settings)
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in SETTINGS:
                return f"usage: /settings [K=V ...] with K among {', '.join(SETTINGS)}"
            try:
                new[key] = int(value) if key in ("top_k", "max_new_tokens") else float(value)
            except ValueError:
                return f"{key}: {value!r} is not a number"
        try:
            self.params = self._sampling(new)
        except UserError as exc:
            return f"error: {exc}"
        self.settings = new
        return " ".join(f"{k}={v}" for k, v in self.settings.items())

    def messages(self) -> List[dict]:
        """The conversation as template messages (system first)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> List[int]:
        """Ids of the conversation plus the generation prompt, oldest exchanges dropped to fit the context."""
        limit = self.engine.model.config.max_seq_len
        room = min(self.settings["max_new_tokens"], limit // 2)  # keep space for an answer
        while True:
            ids = self.tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True)
            if len(ids) + room <= limit or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # the oldest user/assistant exchange
        if len(ids) >= limit:
            self.history = self.history[:-1]
            raise UserError(f"the message is too long for the model's context of {limit} tokens")
        return ids

    def answer(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the answer's text; the answer (even cut short) joins the history."""
        from ..generation.streaming import fit_to_context

        self.history.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        model = self.engine.model
        max_new, _ = fit_to_context(len(ids), self.settings["max_new_tokens"], model.config.max_seq_len,
                                    self.engine.has_full_attention)
        stop, decoder, shown = self.tokenizer.stop_ids, self.tokenizer.incremental_decoder(), []
        try:
            for token in self.engine.stream([ids], max_new, self.params, self.generator):
                token_id = int(token[0])
                if token_id in stop:
                    break
                piece = decoder.push(token_id)
                shown.append(piece)
                yield piece
            piece = decoder.flush()
            shown.append(piece)
            yield piece
        finally:  # also on Ctrl-C or when the consumer stops early
            self.history.append({"role": "assistant", "content": "".join(shown)})


def run_chat(args) -> int:
    from ..generation import Engine
    from .generate import load_from_args

    settings = {k: getattr(args, k) for k in SETTINGS}
    ChatSession._sampling(settings)  # bad flags fail before the model loads
    model, tokenizer, _ = load_from_args(args)
    session = ChatSession(Engine(model, prepare_model=True), tokenizer, settings, args.system, args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        template = "its own" if tokenizer.chat_template else "the plain fallback"
        sys.stderr.write(f"chatting with {args.ckpt} ({template} chat template); /help for commands\n")
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt
            sys.stderr.write("\n")
            continue
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            reply = session.command(line)
        except EOFError:
            return 0
        if reply is not None:
            sys.stderr.write(reply + "\n")
            continue
        _stream_answer(session, line.rstrip("\r\n"))


def _read_line(interactive: bool) -> Optional[str]:
    """One line of input (None at the end of input)."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _stream_answer(session: ChatSession, text: str) -> None:
    """Print the answer as it comes; Ctrl-C ends it early and the session goes on."""
    out = sys.stdout
    pieces = session.answer(text)
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(" [stopped]")
    except UserError as exc:
        pieces.close()
        sys.stderr.write(f"error: {exc}\n")
        return
    out.write("\n")
    out.flush()
