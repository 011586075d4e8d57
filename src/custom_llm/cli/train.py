"""``custom-llm train``."""
from ._pending import register_pending


def register(sub) -> None:
    register_pending(sub, "train", "train a model")
