"""Which tokens of a foreign (Hugging Face) tokenizer play the bos/eos/pad/unk roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# Common spellings, tried in order when no tokenizer_config.json names a role.
_CANDIDATES = {
    "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>"),
    "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
    "unk": ("<unk>",),
}


def _content(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def hf_special_roles(added: set, folder: Path) -> dict:
    """Role -> token text, from ``folder/tokenizer_config.json`` when present, else by common names."""
    config = {}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}
    roles = {}
    for role, names in _CANDIDATES.items():
        token = _content(config.get(f"{role}_token")) if isinstance(config, dict) else None
        if token is None:
            token = next((n for n in names if n in added), None)
        roles[role] = token
    return roles
