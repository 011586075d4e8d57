"""``custom-llm tokenizer train|encode|decode``."""
from ._pending import register_pending


def register(sub) -> None:
    register_pending(sub, "tokenizer", "train or apply a tokenizer")
