"""``custom-llm bench``."""
from ._pending import register_pending


def register(sub) -> None:
    register_pending(sub, "bench", "benchmark against Hugging Face transformers")
