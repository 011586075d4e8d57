"""The default conversation set: standard-library functions explained by their own docstrings.

Built from the default pre-training corpus (the running Python's standard library), so fine-tuning
works without a download: for each public function, and each public method of a public top-level
class, that has a docstring, a user asks about it ("What does json.dumps do?") and the assistant
answers with its signature and the first paragraph of its docstring, always in the same shape.
"""

from __future__ import annotations

import ast
import inspect
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple


QUESTIONS = ("What does {name} do?", "Explain {name}.", "What is {name} for?", "How do I use {name}?")
SYSTEM_PROMPT = "You answer questions about the Python standard library."
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "__main__"}


def _function_answers(path: Path, module: str) -> Iterator[Tuple[str, str]]:
    """(qualified name, answer) for each public function or method (of a public top-level class) in ``path``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    found = [(f"{module}.{node.name}", node, False) for node in tree.body if isinstance(node, ast.FunctionDef)]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            found += [(f"{module}.{cls.name}.{node.name}", node, True) for node in cls.body
                      if isinstance(node, ast.FunctionDef)]
    for name, node, method in found:
        doc = ast.get_docstring(node)
        first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split()) if doc else ""
        if node.name.startswith("_") or not 20 <= len(first) <= 400:
            continue
        args = node.args
        if method and args.args and args.args[0].arg in ("self", "cls"):
            args = ast.arguments(posonlyargs=args.posonlyargs, args=args.args[1:], vararg=args.vararg,
                                 kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                                 defaults=args.defaults[-len(args.args) + 1:] if len(args.args) > 1 else [])
        yield name, f"`{name}({ast.unparse(args)})`: {first}"


def default_conversations(root: Optional[Path] = None, max_files: Optional[int] = None) -> List[List[dict]]:
    """Questions about standard-library functions and methods, answered with their signature and docstring.

    Every answer has the same shape, ``\\`module.name(args)\\`: first docstring paragraph``, so a
    fine-tuned model visibly follows the format. A quarter of the conversations carry a system
    prompt and every third asks a follow-up about the next function of the same module.
    """
    from .sources import default_corpus_files, default_corpus_root

    root = Path(root) if root is not None else default_corpus_root()
    conversations: List[List[dict]] = []
    files = [p for p in default_corpus_files(root) if not (SKIP_PARTS & set(p.relative_to(root).parts))]
    for path in files[:max_files]:
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not parts or any(part.startswith("_") for part in parts):
            continue
        answers = list(_function_answers(path, ".".join(parts)))
        for k, (name, answer) in enumerate(answers):
            salt = zlib.crc32(name.encode())
            turns = [{"role": "user", "content": QUESTIONS[salt % len(QUESTIONS)].format(name=name)},
                     {"role": "assistant", "content": answer}]
            if salt % 3 == 0 and k + 1 < len(answers):
                follow, follow_answer = answers[k + 1]
                turns += [{"role": "user", "content": f"And {follow}?"},
                          {"role": "assistant", "content": follow_answer}]
            if salt % 4 == 0:
                turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            conversations.append(turns)
    return conversations
