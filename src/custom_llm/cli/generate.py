"""``custom-llm generate`` and ``custom-llm eval``."""
from ._pending import register_pending


def register(sub) -> None:
    register_pending(sub, "generate", "generate text from a checkpoint")
    register_pending(sub, "eval", "evaluate loss, perplexity and bits per byte")
