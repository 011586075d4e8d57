"""What a foreign (Hugging Face) folder says about its tokenizer: the bos/eos/pad/unk roles, the chat
template (``tokenizer_config.json``'s ``chat_template`` or a ``chat_template.jinja`` file) and extra
end-of-turn ids (``generation_config.json``'s ``eos_token_id`` list)."""

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


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def hf_chat_template(folder: Path) -> Optional[str]:
    """The folder's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s entry.

    A list of named templates (the older multi-template format) gives its "default" one.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def hf_end_of_turn_ids(folder: Path) -> list:
    """Ids ``generation_config.json`` lists as ``eos_token_id`` (an int or a list of them)."""
    value = _read_json(folder / "generation_config.json").get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def hf_special_roles(added: set, folder: Path) -> dict:
    """Role -> token text, from ``folder/tokenizer_config.json`` when present, else by common names."""
    config = _read_json(folder / "tokenizer_config.json")
    roles = {}
    for role, names in _CANDIDATES.items():
        token = _content(config.get(f"{role}_token")) if isinstance(config, dict) else None
        if token is None:
            token = next((n for n in names if n in added), None)
        roles[role] = token
    return roles
