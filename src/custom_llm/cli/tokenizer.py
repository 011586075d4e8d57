"""``custom-llm tokenizer train|encode|decode``: thin wrappers over :mod:`custom_llm.tokenizers`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from ..tokenizers import KINDS


def register(sub) -> None:
    parser = sub.add_parser("tokenizer", help="train or apply a tokenizer",
                            description="Train a tokenizer on text, or encode/decode with one.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    train = actions.add_parser("train", help="train a tokenizer and write OUT/tokenizer.json")
    train.add_argument("--data", nargs="*", default=None, metavar="SOURCE",
                       help="text files, directories, globs, .jsonl files or hf:NAME[:CONFIG] "
                            "(default: the embedded corpus, this Python's standard library sources)")
    train.add_argument("--out", required=True, help="output directory (or a path ending in .json)")
    train.add_argument("--tokenizer", "--kind", dest="kind", default="auto", choices=KINDS,
                       help="bpe (needs the tokenizers package), char, or auto (bpe when available)")
    train.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (rounded up to a multiple of 64)")
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    train.add_argument("--extensions", default=None, help="comma-separated file extensions kept from directories")
    train.add_argument("--force", action="store_true", help="write into a folder that already holds files "
                       "(a checkpoint's tokenizer.json must match its model: this replaces it)")
    train.set_defaults(func=run_train)

    encode = actions.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory/checkpoint holding one")
    _add_text_input(encode, "text to encode (default: standard input)")
    encode.add_argument("--json", action="store_true", help="print a JSON list instead of space-separated ids")
    encode.set_defaults(func=run_encode)

    decode = actions.add_parser("decode", help="print the text of token ids")
    decode.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory/checkpoint holding one")
    decode.add_argument("ids", nargs="*", help="token ids (default: read from standard input, spaces/commas/JSON)")
    decode.add_argument("--keep-special", action="store_true", help="print special tokens instead of dropping them")
    decode.set_defaults(func=run_decode)


def _add_text_input(parser, help_text: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text", help=help_text)
    group.add_argument("--file", help="read the text from this file")


def run_train(args) -> int:
    from ..data import load_documents
    from ..tokenizers import train_tokenizer

    out = Path(args.out)
    folder = out.parent if out.suffix == ".json" else out
    target = out if out.suffix == ".json" else folder / "tokenizer.json"
    if out.exists() and not out.is_dir() and out.suffix != ".json":
        raise UserError(f"--out {out} is a file; give a folder (or a path ending in .json)")
    occupied = target.exists() or (out.suffix != ".json" and folder.is_dir() and any(folder.iterdir()))
    if occupied and not args.force:
        raise UserError(f"--out {out} already holds files (a checkpoint's tokenizer must match its model); "
                        f"choose an empty folder or pass --force to replace {target.name}")
    docs = load_documents(args.data, text_field=args.text_field, extensions=args.extensions)
    tokenizer = train_tokenizer((d.text for d in docs), kind=args.kind, vocab_size=args.vocab_size)
    if tokenizer.kind == "bpe" and tokenizer.vocab_size < args.vocab_size:
        print(f"note: asked for {args.vocab_size} tokens; the data supports only {tokenizer.vocab_size} "
              f"(every merge it offers is used)", file=sys.stderr)
    path = tokenizer.save(folder)
    if out.suffix == ".json" and path != out:
        path = path.replace(out)
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens, {len(docs)} documents -> {path}")
    return 0


def _load(args):
    from ..api import load_tokenizer

    return load_tokenizer(args.tokenizer)


def run_encode(args) -> int:
    tokenizer = _load(args)
    if args.text is not None:
        text = args.text
    elif args.file is not None:
        from ..data.sources import read_text_file

        text = read_text_file(args.file)
    else:
        from ..data.sources import read_stream_text

        text = read_stream_text(sys.stdin)
    ids = tokenizer.encode(text)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def run_decode(args) -> int:
    tokenizer = _load(args)
    if args.ids:
        raw = " ".join(args.ids)
    else:
        from ..data.sources import read_stream_text

        raw = read_stream_text(sys.stdin)
    try:
        ids = [int(t) for t in raw.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    except ValueError:
        raise UserError("decode expects integer token ids") from None
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")
    sys.stdout.write(tokenizer.decode(ids, skip_special_tokens=not args.keep_special) + "\n")
    return 0
