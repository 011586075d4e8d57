"""``custom-llm export`` and ``custom-llm import``."""
from ._pending import register_pending


def register(sub) -> None:
    register_pending(sub, "export", "export a checkpoint to the Hugging Face format")
    register_pending(sub, "import", "import a Hugging Face model folder")
