"""Tokenizers to and from Hugging Face folders (``tokenizer.json`` + ``tokenizer_config.json``).

Our BPE files already are Hugging Face ``tokenizers`` files and are written as they are. The
character tokenizer has its own small JSON; for export it is rebuilt as a ``tokenizers`` pipeline
that gives the same ids: a WordLevel model whose vocabulary is our id table, a pre-tokenizer that
isolates every character, and a ``Fuse`` decoder that joins tokens without spaces. On import such a
file is recognised and turned back into our character format, so a round trip is exact.

One difference remains by design: ours treats the text "<|eos|>" inside a document as plain text,
while a Hugging Face tokenizer maps it to the special token (pass ``split_special_tokens=True`` there
to get our behaviour).

Chat: ``tokenizer_config.json`` carries the chat template and every special token in
``added_tokens_decoder``, so ``AutoTokenizer.apply_chat_template(messages, tokenize=True)`` gives our
ids; when the tokenizer has end-of-turn tokens, ``generation_config.json``'s ``eos_token_id`` becomes
the list of stop ids so that ``model.generate`` stops where ``custom-llm chat`` does. Import copies a
folder's ``chat_template.jinja`` and ``generation_config.json`` beside its tokenizer files, so an
imported model keeps its own template and end-of-turn tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ..checkpoint_io import write_json
from ..errors import UserError
from ..tokenizers import CHAT_TOKENS, SPECIAL_TOKENS, CharTokenizer, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
_ROLE_TOKENS = dict(zip(("bos", "eos", "pad", "unk"), SPECIAL_TOKENS))


def char_to_hf_json(tokenizer: CharTokenizer) -> str:
    """The character tokenizer as a Hugging Face ``tokenizer.json`` string that encodes the same ids."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    chat = [tok for tok in CHAT_TOKENS if tok in tokenizer.special_tokens()]
    itos = list(SPECIAL_TOKENS) + tokenizer.chars + chat
    hf = HFTokenizer(models.WordLevel({tok: i for i, tok in enumerate(itos)}, unk_token=_ROLE_TOKENS["unk"]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    hf.decoder = decoders.Fuse()  # join pieces as they are (no spaces between them)
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in list(SPECIAL_TOKENS) + chat])
    return hf.to_str(pretty=True)


def hf_json_to_char(data: dict) -> Optional[CharTokenizer]:
    """Our character tokenizer when ``data`` is a tokenizer.json written by :func:`char_to_hf_json`, else None."""
    model = data.get("model") or {}
    if model.get("type") != "WordLevel" or (data.get("decoder") or {}).get("type") != "Fuse":
        return None
    vocab = model.get("vocab") or {}
    itos = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in itos] != list(range(len(itos))) or itos[:len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        return None
    chars = itos[len(SPECIAL_TOKENS):]
    chat = chars[-len(CHAT_TOKENS):] == list(CHAT_TOKENS)
    if chat:
        chars = chars[:-len(CHAT_TOKENS)]
    if any(len(c) != 1 for c in chars):
        return None
    return CharTokenizer(chars, chat_tokens=chat)


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    """``tokenizer_config.json``: the generic fast tokenizer class and which token plays which role."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    for role, token_id in tokenizer.special_ids().items():
        if token_id >= 0:
            config[f"{role}_token"] = tokenizer.decode([token_id], skip_special_tokens=False)
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {str(i): {"content": text, **flags}
                                      for text, i in sorted(tokenizer.special_tokens().items(), key=lambda kv: kv[1])}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return config


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` that ``AutoTokenizer`` loads."""
    out_dir = Path(out_dir)
    text = char_to_hf_json(tokenizer) if tokenizer.kind == "char" else tokenizer.to_json_str()
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    config = tokenizer_config(tokenizer, max_length)
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json",
               {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
    generation = out_dir / "generation_config.json"
    if tokenizer.end_of_turn_ids and generation.is_file():  # stop HF generate at the end of a turn too
        settings = json.loads(generation.read_text(encoding="utf-8"))
        settings["eos_token_id"] = sorted(tokenizer.stop_ids)
        write_json(generation, settings)


def import_tokenizer(hf_dir: Path, out_dir: Path) -> bool:
    """Copy an HF folder's tokenizer files into a checkpoint (ours go back to our char format).

    Returns False when the folder has no ``tokenizer.json`` (e.g. only a SentencePiece model).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    source = hf_dir / "tokenizer.json"
    if not source.is_file():
        return False
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{source}: not a readable tokenizer file ({exc})") from None
    char = hf_json_to_char(data) if isinstance(data, dict) else None
    if char is not None:
        char.save(out_dir)
        return True
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    return True
