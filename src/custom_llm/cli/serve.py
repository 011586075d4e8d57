"""``custom-llm serve``: an OpenAI-compatible HTTP server (and chat page) over the batching engine."""

from __future__ import annotations

from ..errors import UserError


def register(sub) -> None:
    from .generate import add_model_args

    serve = sub.add_parser(
        "serve", help="serve a model over the OpenAI API, with a chat page",
        description="Serve a checkpoint, run directory or Hugging Face folder over HTTP: /v1/models, "
                    "/v1/completions, /v1/chat/completions (streaming as OpenAI does), /health, /metrics "
                    "(Prometheus) and a chat page at /. Requests are batched continuously over --max-batch "
                    "slots; beyond --max-queue waiting requests the server answers 503 with Retry-After.")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests generated together (KV cache slots, default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503 (default 64)")
    serve.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint folder's name)")
    compiling = serve.add_mutually_exclusive_group()
    compiling.add_argument("--compile", dest="compile", action="store_true", default=None,
                           help="compile the batched decode step (default on CUDA: CUDA graphs)")
    compiling.add_argument("--no-compile", dest="compile", action="store_false", help="decode eagerly")
    serve.set_defaults(func=run_serve)


def run_serve(args) -> int:
    for name in ("max_batch", "max_queue", "port"):
        low = 1 if name == "max_batch" else 0
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low} (got {getattr(args, name)})")
    if args.port > 65535:
        raise UserError(f"--port must be at most 65535 (got {args.port})")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"serving needs FastAPI and uvicorn ({exc}); reinstall custom-llm with its dependencies") from None
    from ..serving import load_served_model, serve

    served = load_served_model(args.ckpt, name=args.model_name, device=args.device, dtype=args.dtype,
                               max_batch=args.max_batch, max_queue=args.max_queue, compile=args.compile,
                               quantize=args.quantize, group_size=args.group_size)
    try:
        serve(served, host=args.host, port=args.port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
