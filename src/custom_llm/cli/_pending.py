"""Placeholder registration for sub-commands whose implementation has not landed yet."""

from ..errors import UserError


def register_pending(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=f"{help_text} (not available yet)")

    def run(args):
        raise UserError(f"'custom-llm {name}' is not available in this version yet")

    parser.set_defaults(func=run)
