"""The served model (engine + tokenizer + name) and running the app under uvicorn.

:class:`ServedModel` turns text and chat messages into prompt ids; :func:`serve` runs the HTTP
server until interrupted; :class:`ServerThread` runs it on a background thread (tests, benchmarks).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..generation.batch import BatchEngine
from .protocol import invalid

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """What the server serves: a batching engine, its tokenizer and the public model name.

    ``start_id``: the token put before a completion prompt (the one the model saw at the start of
    every training document: EOS for checkpoints trained here, BOS for Hugging Face folders), or None.
    """

    name: str
    engine: BatchEngine
    tokenizer: object
    start_id: Optional[int] = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.engine.max_len

    @property
    def stop_ids(self) -> set[int]:
        """End-of-sequence and end-of-turn ids (the tokenizer's ``stop_ids``, else its EOS)."""
        ids = getattr(self.tokenizer, "stop_ids", None)
        if ids is None:
            eos = getattr(self.tokenizer, "eos_id", -1)
            ids = {eos} if eos is not None and eos >= 0 else set()
        return set(ids)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Ids of a completion prompt: the start token, then the text's tokens (token-id prompts as given)."""
        if isinstance(prompt, list):
            vocab = self.engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise invalid(f"token ids must be in [0, {vocab})", "prompt")
            return prompt
        return ([self.start_id] if self.start_id is not None else []) + self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation rendered with the tokenizer's chat template, ready for the answer."""
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None:  # a tokenizer without chat support: the plain template of tokenizers/chat_template.py
            text = "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages) + "Assistant:\n"
            return self.prompt_ids(text)
        try:
            return list(apply(messages, add_generation_prompt=True))
        except ValueError as exc:
            raise invalid(str(exc), "messages") from None


def load_served_model(ckpt: str, *, name: Optional[str] = None, device: Optional[str] = None, dtype: str = "auto",
                      max_batch: int = 8, max_queue: int = 64, compile: Optional[bool] = None,
                      quantize: Optional[str] = None, group_size: int = 32) -> ServedModel:
    """Load a checkpoint, run directory or Hugging Face folder into a :class:`ServedModel`
    (``device``, ``dtype``, ``quantize``, ``group_size``: as :func:`custom_llm.api.load_for_inference`)."""
    from pathlib import Path

    from ..api import load_for_inference

    model, tokenizer, start = load_for_inference(ckpt, device, dtype, quantize, group_size)
    engine = BatchEngine(model, max_batch=max_batch, max_queue=max_queue, compile=compile)
    path = Path(ckpt).resolve()
    default_name = path.name if not path.name.startswith("ckpt-") else path.parent.name
    return ServedModel(name or default_name, engine, tokenizer, start)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free port, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _uvicorn_server(served: ServedModel, log_level: str, **app_options):
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(served, **app_options), log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=2)
    return uvicorn.Server(config)


def serve(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **app_options) -> None:
    """Serve until interrupted (Ctrl-C)."""
    sock = bind_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d (max batch %d, queue %d): open it in a browser to chat", served.name,
             shown, sock.getsockname()[1], served.engine.max_batch, served.engine.max_queue)
    _uvicorn_server(served, log_level, **app_options).run(sockets=[sock])


class ServerThread:
    """The server on a background thread, on 127.0.0.1 and a free port: ``with ServerThread(served) as url:``."""

    def __init__(self, served: ServedModel, host: str = "127.0.0.1", **app_options):
        self.served = served
        self.sock = bind_socket(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _uvicorn_server(served, "warning", **app_options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
