"""OpenAI request bodies in, validated plain values out; OpenAI error bodies for everything rejected.

Validation is by hand (not pydantic models) so that every rejection names the field and the rule, in
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``. Fields clients commonly send
that do not apply here (``user``, ``metadata``, ``store``, ...) are ignored; features this server does
not have (tools, structured output, ...) are refused with a 400 that names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..generation.sampling import SamplingParams

MAX_N = 16
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = ("system", "developer", "user", "assistant")

# Features a request may ask for that this server does not have: a 400 naming them.
UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "audio", "prediction",
                    "web_search_options", "logit_bias")
UNSUPPORTED_COMPLETION = ("suffix", "logit_bias")


class APIError(Exception):
    """An HTTP error with OpenAI's JSON body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationSpec:
    """The generation fields shared by completions and chat completions, validated."""

    max_tokens: Optional[int]
    """As asked; None: :attr:`default_max_tokens`, or the rest of the context."""
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely alternatives'."""
    default_max_tokens: Optional[int] = None
    """Completions default to 16 tokens, as OpenAI's do; chat to the rest of the context."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(f"'{name}' must be a number (got {value!r})", name)
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise invalid(f"'{name}' must be in {bracket}{low}, {high}] (got {value})", name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise invalid(f"'{name}' must be an integer (got {value!r})", name)
    if value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise invalid(f"'{name}' must be {rule} (got {value})", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean (got {value!r})", name)
    return value


def _refuse(body: dict, names: tuple[str, ...]) -> None:
    asked = [n for n in names if body.get(n) not in (None, [], {})]
    if asked:
        raise invalid(f"not supported by this server: {', '.join(asked)}", asked[0], "unsupported_parameter")


def check_model(body: dict, served: str) -> None:
    """A named model must be the served one (404 otherwise); a missing name means the served model."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string (got {model!r})", "model")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def parse_generation(body: dict, *, chat: bool) -> GenerationSpec:
    """The shared generation fields of a request body."""
    max_tokens = _integer(body, "max_tokens", None, 1)
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1)  # the newer name wins
    top_k = _integer(body, "top_k", 0, -1)
    params_fields = dict(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=0 if top_k == -1 else top_k,  # -1 is "off" in vLLM and llama.cpp
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, open_low=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object", "stream_options")
        include_usage = _boolean(options, "include_usage", False)
    spec = GenerationSpec(max_tokens=max_tokens, params=SamplingParams(**params_fields), stop=_stops(body),
                          seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
                          n=_integer(body, "n", 1, 1, MAX_N), stream=stream, include_usage=include_usage)
    if chat:
        wants = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wants:
            raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
        spec.logprobs = (top or 0) if wants else None
    else:
        spec.default_max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
        spec.logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        if _boolean(body, "echo", False):
            raise invalid("not supported by this server: echo", "echo", "unsupported_parameter")
        if _integer(body, "best_of", 1, 1) != spec.n and body.get("best_of") is not None:
            raise invalid("not supported by this server: best_of other than n", "best_of", "unsupported_parameter")
    return spec


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOPS:
        raise invalid(f"'stop' may hold at most {MAX_STOPS} strings (got {len(stop)})", "stop")
    return [s for s in stop if s]


def parse_prompts(body: dict) -> list[str | list[int]]:
    """``prompt`` of a completion request: a string, a list of strings, token ids, or a list of id lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required", "prompt")
    _refuse(body, UNSUPPORTED_COMPLETION)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise invalid("'prompt' must be a string, a non-empty list of strings, or token ids", "prompt")


def parse_messages(body: dict) -> list[dict]:
    """``messages`` of a chat request as ``[{"role", "content": str}]`` (``developer`` becomes ``system``)."""
    _refuse(body, UNSUPPORTED_CHAT)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid("not supported by this server: response_format other than {'type': 'text'}",
                      "response_format", "unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})", f"{where}.role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}.content: only text parts are supported (got {kind!r})", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
