"""Chat templates: ChatML for models trained here, any Hugging Face Jinja template for imported ones.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. A Jinja template turns it into
text; the tokenizer turns the text into ids. Rendering follows the conventions of transformers'
``apply_chat_template`` so that templates from the Hub behave the same here: a sandboxed immutable
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that does not escape HTML (``json.dumps(ensure_ascii=False)``), the globals ``raise_exception``
and ``strftime_now``, and the special tokens (``bos_token``, ``eos_token``, ...) as variables.

Two things are added on top of plain rendering:

* ``{% generation %}...{% endgeneration %}`` marks what the assistant produces. Rendering reports
  those character spans, and supervised fine-tuning puts its loss on exactly the tokens inside them.
* Special tokens come only from the template. Before rendering, every special token's text inside a
  message (a user typing ``<|im_start|>``) is swapped for a placeholder that the template cannot
  mistake for a token; after rendering, the placeholders become ordinary text again. The renderer
  reports where the template itself emitted special tokens, and only those become special ids.
  (transformers tokenizes the rendered string as a whole, so there a user's ``<|im_start|>`` would
  become the special token; for every conversation without such text the ids are identical.)
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, List, Optional, Sequence, Tuple

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)

# ChatML (OpenAI 2023, as used by Qwen): every turn is "<|im_start|>role\n" + content + "<|im_end|>\n".
# The assistant's content and its <|im_end|> are the generation span, the part the model learns to write.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# For a tokenizer without chat tokens and without a template of its own (a base model trained here
# before fine-tuning): labelled paragraphs, each assistant turn closed by the end-of-sequence token.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n\\n' }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

# Markers the {% generation %} block wraps around its output; message text never contains them
# because they are escaped like special tokens before rendering.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass
class RenderedChat:
    """A rendered conversation: its text, the generation spans and where the template put special tokens."""

    text: str
    generation_spans: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) character ranges
    special_tokens: List[Tuple[int, str]] = field(default_factory=list)  # (character offset, token text)

    def in_generation(self, position: int) -> bool:
        """True when character ``position`` lies inside a ``{% generation %}`` block."""
        return any(start <= position < end for start, end in self.generation_spans)


def _generation_extension():
    """A Jinja extension for ``{% generation %}``: the block's output is wrapped in the span markers."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

        def _wrap(self, caller) -> str:
            return _OPEN + caller() + _CLOSE

    return GenerationBlock


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile a chat template in transformers' environment (sandboxed, trim/lstrip blocks, loop controls)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _strings(value) -> List[str]:
    """Every string inside nested dicts/lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _escape(value, protected: Sequence[str], nonce: str):
    """``value`` with each protected string replaced by ``nonce + index + nonce`` (recursively)."""
    if isinstance(value, str):
        for i, text in enumerate(protected):
            value = value.replace(text, f"{nonce}{i}{nonce}")
        return value
    if isinstance(value, dict):
        return {k: _escape(v, protected, nonce) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v, protected, nonce) for v in value]
    return value


def _pick_nonce(texts: Sequence[str]) -> str:
    """A private-use character that occurs in none of ``texts``."""
    joined = "".join(texts)
    code = 0xF0000  # Supplementary Private Use Area-A
    while chr(code) in joined:
        code += 1
    return chr(code)


def render(template: str, messages: Sequence[dict], special_tokens: Sequence[str], add_generation_prompt: bool = True,
           **variables: Any) -> RenderedChat:
    """Render ``messages`` with ``template``; special token text inside messages stays ordinary text."""
    special_tokens = sorted(set(special_tokens), key=len, reverse=True)  # longest first: no partial matches
    protected = list(special_tokens) + [_OPEN, _CLOSE]
    nonce = _pick_nonce(_strings(messages) + _strings(variables) + [template])
    safe_messages = _escape([dict(m) for m in messages], protected, nonce)
    raw = compile_template(template).render(messages=safe_messages, add_generation_prompt=add_generation_prompt,
                                            **variables)
    pattern = "|".join([re.escape(_OPEN), re.escape(_CLOSE), re.escape(nonce) + r"(\d+)" + re.escape(nonce)]
                       + [re.escape(t) for t in special_tokens])
    out: List[str] = []
    length, depth, span_start = 0, 0, 0
    rendered = RenderedChat("")
    cursor = 0
    for match in re.finditer(pattern, raw):
        out.append(raw[cursor:match.start()])
        length += match.start() - cursor
        cursor = match.end()
        piece = match.group(0)
        if piece == _OPEN:
            if depth == 0:
                span_start = length
            depth += 1
        elif piece == _CLOSE:
            depth -= 1
            if depth == 0 and length > span_start:
                rendered.generation_spans.append((span_start, length))
        elif match.group(1) is not None:  # a message's own special-token text: ordinary characters
            text = protected[int(match.group(1))]
            out.append(text)
            length += len(text)
        else:  # the template emitted a special token
            rendered.special_tokens.append((length, piece))
            out.append(piece)
            length += len(piece)
    out.append(raw[cursor:])
    rendered.text = "".join(out)
    return rendered


def check_messages(messages: Any) -> Optional[str]:
    """Why ``messages`` is not a list of ``{"role": str, "content": str}`` dicts, or None when it is."""
    if not isinstance(messages, (list, tuple)):
        return "messages must be a list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        if not isinstance(message.get("role"), str):
            return f"message {i} has no string 'role'"
        if not isinstance(message.get("content"), str):
            return f"message {i} has no string 'content'"
    return None
