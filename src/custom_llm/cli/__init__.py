"""``custom-llm``: thin sub-commands over the library.

Each sub-command lives in its own module here exposing ``register(subparsers)``, which adds its parser
and sets ``func`` to a function of the parsed arguments. User errors (:class:`UserError`, bad flags)
and operating-system errors on a path (cannot create, not a directory, permission denied, disk full)
become one ``error: ...`` line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..errors import UserError

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def build_parser() -> ArgumentParser:
    from . import (bench, chat, consolidate, eval, finetune, generate, interop, plan, quantize, report, serve,
                   tokenizer, train)

    parser = ArgumentParser(prog="custom-llm", description="Train, run and exchange modern decoder-only LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    # In the order of a user's day: train, use, evaluate, exchange, measure.
    for module in (train, finetune, generate, chat, serve, eval, report, interop, quantize, consolidate, plan, bench,
                   tokenizer):
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # name the sub-command whose flags these are not
        prog = f"custom-llm {args.command}" if getattr(args, "command", None) else "custom-llm"
        sys.stderr.write(f"error: {prog}: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)\n")
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a path the user gave cannot be read or written (or the disk is full)
        sys.stderr.write(f"error: {describe_os_error(exc)}\n")
        return 2
    return int(result or 0)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: its message (what failed) and the path, without the errno noise."""
    message = exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{message}: {' -> '.join(paths)}" if paths else message


if __name__ == "__main__":
    sys.exit(main())
