"""An OpenAI-compatible HTTP server over the continuous-batching engine, with a web chat page.

    served = load_served_model("runs/my-run", max_batch=8)
    serve(served, host="127.0.0.1", port=8000)

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming as Server-Sent
Events, framed as OpenAI frames them), ``/health``, ``/metrics`` (Prometheus) and ``/`` (the chat page).
The model runs on the engine's worker thread (:class:`~custom_llm.generation.batch.BatchEngine`).
"""

from .server import ServedModel, ServerThread, load_served_model, serve

__all__ = ["ServedModel", "ServerThread", "create_app", "load_served_model", "serve"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
