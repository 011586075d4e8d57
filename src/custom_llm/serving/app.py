"""The FastAPI app: OpenAI's completions and chat completions, models, health, metrics, the chat page.

The HTTP layer is thin: it validates a request (:mod:`.protocol`), turns it into prompt ids, submits
one :class:`~custom_llm.generation.batch.GenerationRequest` per choice to the batching engine (which
runs the model on its own thread, never on the event loop), and relays the text deltas that the
choices post (:mod:`.streams`), either as one JSON response or as Server-Sent Events framed as
OpenAI frames them: ``data: {chunk}`` lines, a final chunk per choice with its ``finish_reason``,
an optional usage chunk, then ``data: [DONE]``. A client that goes away has its requests cancelled,
which frees their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.batch import GenerationRequest, QueueFull
from .metrics import Metrics
from .protocol import (APIError, GenerationSpec, check_model, invalid, parse_generation, parse_messages,
                       parse_prompts)
from .server import ServedModel
from .streams import ChoiceStream, Event, chat_logprobs, completion_logprobs, poster

MAX_BODY_BYTES = 4 << 20
DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request looks for its client having gone
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


def create_app(served: ServedModel, *, max_body_bytes: int = MAX_BODY_BYTES, retry_after_s: int = 1) -> FastAPI:
    """The app for one served model; the engine's worker thread runs while the app is up."""
    engine = served.engine
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="custom-llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.metrics = served, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Unknown route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        error = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: OpenAI's shape, keep serving
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "active_slots": engine.active_slots,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model({"model": model_id}, served.name)
        return _model_card(served)

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _read_json(request, max_body_bytes)
        check_model(body, served.name)
        prompts = parse_prompts(body)
        spec = parse_generation(body, chat=False)
        ids = await asyncio.to_thread(lambda: [served.prompt_ids(p) for p in prompts])  # keep the loop free
        return await _generate(request, ids, spec, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, max_body_bytes)
        check_model(body, served.name)
        messages = parse_messages(body)
        spec = parse_generation(body, chat=True)
        ids = await asyncio.to_thread(served.chat_ids, messages)
        return await _generate(request, [ids], spec, chat=True)

    async def _generate(request: Request, prompts: list[list[int]], spec: GenerationSpec, chat: bool) -> Response:
        start = time.perf_counter()
        capacity = engine.max_batch + engine.max_queue
        if len(prompts) * spec.n > capacity:  # could never be admitted: not a 503 to retry, a 400
            raise invalid(f"{len(prompts)} prompt(s) x n={spec.n} choices exceed what this server holds at once "
                          f"({capacity}: --max-batch + --max-queue)", "n")
        max_tokens = _max_tokens(served, prompts, spec.max_tokens, "messages" if chat else "prompt",
                                 spec.default_max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        post = poster(loop, queue)
        requests: list[GenerationRequest] = []
        for prompt in prompts:
            for j in range(spec.n):
                stream = ChoiceStream(len(requests), served.tokenizer, spec.stop, post, metrics, start)
                seed = None if spec.seed is None else spec.seed + j  # n seeded choices differ, reproducibly
                requests.append(GenerationRequest(prompt, max_tokens, spec.params, seed=seed, stop_ids=served.stop_ids,
                                                  logprobs=spec.logprobs, on_token=stream.on_token,
                                                  on_finish=stream.on_finish))
        try:
            for r in requests:
                engine.submit(r)
        except QueueFull as exc:
            for r in requests:
                engine.cancel(r)
            raise APIError(503, f"The server is busy ({exc}); retry shortly", type="server_error",
                           code="queue_full", headers={"Retry-After": str(retry_after_s)}) from None
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * spec.n)
        reply = _Reply(served, spec, chat, prompts, requests)
        if spec.stream:
            return StreamingResponse(_stream(reply, queue, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(reply, queue, request))

    async def _stream(reply: "_Reply", queue: asyncio.Queue, request: Request) -> AsyncIterator[str]:
        try:
            if reply.chat:
                for index in range(len(reply.requests)):
                    yield reply.sse(index, delta={"role": "assistant", "content": ""})
            remaining = len(reply.requests)
            while remaining:
                event = await queue.get()
                reply.add(event)
                if event.text or (reply.spec.logprobs is not None and event.steps):
                    yield reply.sse(event.index, text=event.text, steps=event.steps)
                if event.finish is not None:
                    remaining -= 1
                    if event.finish == "error":
                        yield _sse(APIError(500, "generation failed", type="server_error").body())
                    else:
                        yield reply.sse(event.index, finish=event.finish)
            if reply.spec.include_usage:
                yield _sse({**reply.envelope(), "choices": [], "usage": reply.usage()})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled): free the slots
            for r in reply.requests:
                engine.cancel(r)

    async def _collect(reply: "_Reply", queue: asyncio.Queue, request: Request) -> dict:
        try:
            remaining = len(reply.requests)
            checked = time.perf_counter()
            while remaining:
                if time.perf_counter() - checked > DISCONNECT_CHECK_S:  # a client that gave up frees its slots
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        raise APIError(499, "client closed the request")
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    continue
                reply.add(event)
                remaining -= event.finish is not None
            if "error" in reply.finish.values():
                raise APIError(500, "generation failed", type="server_error")
            return reply.response()
        finally:
            for r in reply.requests:
                engine.cancel(r)

    return app


class _CountRequests:
    """Counts responses by endpoint and status (plain ASGI: it leaves streaming and disconnects alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"]
            self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status[0])).inc()


class _Reply:
    """One request's choices as they accumulate, and their OpenAI shapes (chunks and full responses)."""

    def __init__(self, served: ServedModel, spec: GenerationSpec, chat: bool, prompts: list[list[int]],
                 requests: list[GenerationRequest]):
        self.served, self.spec, self.chat, self.prompts, self.requests = served, spec, chat, prompts, requests
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts = [""] * len(requests)
        self.steps: list[list] = [[] for _ in requests]
        self.finish: dict[int, str] = {}
        self.tokens = [0] * len(requests)

    def add(self, event: Event) -> None:
        self.texts[event.index] += event.text
        self.steps[event.index].extend(event.steps)
        if event.finish is not None:
            self.finish[event.index] = event.finish
            self.tokens[event.index] = event.tokens

    def envelope(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served.name,
                "system_fingerprint": None}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, index: int, steps: list, offset: int) -> Optional[dict]:
        if self.spec.logprobs is None:
            return None
        tokenizer = self.served.tokenizer
        return chat_logprobs(tokenizer, steps) if self.chat else completion_logprobs(tokenizer, steps, offset)

    def sse(self, index: int, *, delta: Optional[dict] = None, text: str = "", steps: Optional[list] = None,
            finish: Optional[str] = None) -> str:
        """One streamed chunk for choice ``index``."""
        logprobs = self._logprobs(index, steps, len(self.texts[index]) - len(text)) if steps else None
        if self.chat:
            choice = {"index": index, "delta": delta if delta is not None else ({"content": text} if finish is None else {}),
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        chunk = {**self.envelope(), "choices": [choice]}
        if self.spec.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def response(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for i, text in enumerate(self.texts):
            logprobs = self._logprobs(i, self.steps[i], 0)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": self.finish[i]})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.envelope(), "object": kind, "choices": choices, "usage": self.usage()}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "custom-llm",
            "context_length": served.context_length, "max_model_len": served.context_length}


def _max_tokens(served: ServedModel, prompts: list[list[int]], asked: Optional[int], param: str,
                default: Optional[int] = None) -> int:
    """The tokens to generate: as asked when prompt + answer fit the context, else a 400 naming the limit."""
    context = served.context_length
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise invalid("the prompt is empty", param)
    if longest >= context and served.engine.bounded or longest > context:
        raise invalid(f"This model's maximum context length is {context} tokens. However, your {param} "
                      f"resulted in {longest} tokens, leaving no room for an answer.", param, "context_length_exceeded")
    room = context - longest if served.engine.bounded else context
    if asked is None:
        return room if default is None else min(default, room)
    if served.engine.bounded and asked > room:
        raise invalid(f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{longest + asked} tokens ({longest} in the {param}, {asked} for the completion). "
                      "Please reduce the length of the prompt or the completion.", "max_tokens",
                      "context_length_exceeded")
    return asked


async def _read_json(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past ``limit`` bytes, 400 for anything but a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is {length} bytes; the limit is {limit}", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"The request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object")
    return body
