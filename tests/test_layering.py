"""The layering of ../shared/DESIGN.md, checked on the import statements of every source file.

cli -> training, generation, interop, evaluation, bench, data, tokenizers; training -> model, data,
tokenizers; generation -> model; evaluation -> generation, tokenizers (+ api, to load a checkpoint by
path); interop -> model, tokenizers; model -> torch + config only; tokenizers, data ->
standard library (+ tokenizers, numpy). Shared leaf modules (config, errors, fsutil, devices, checkpoint_io)
may be imported by any layer that may import the model.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "custom_llm"
LEAVES = {"config", "errors", "fsutil", "devices"}
ALLOWED = {  # layer -> the custom_llm modules/packages it may import (besides itself)
    "model": {"config"},
    "tokenizers": {"errors", "fsutil"},
    "data": {"errors", "fsutil", "tokenizers"},
    "generation": LEAVES | {"model"},
    "interop": LEAVES | {"model", "tokenizers", "checkpoint_io"},
    "training": LEAVES | {"model", "data", "tokenizers", "checkpoint_io"},
    "evaluation": LEAVES | {"generation", "tokenizers", "api"},  # api: load a checkpoint or HF folder by path
    "serving": LEAVES | {"generation", "tokenizers", "api"},  # HTTP only; api loads the served checkpoint
}
NO_TORCH = {"tokenizers", "data"}


def imports_of(path: Path, layer: str) -> tuple[set, set]:
    """(first-level custom_llm modules imported, top-level third-party modules imported) by one file."""
    internal, external = set(), set()
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 1 for model/attention.py
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the package root, then the first name is the module
                parts = ([layer] if node.level <= depth else []) + (node.module.split(".") if node.module else [])
                if node.level <= depth and node.module is None:
                    continue
                names = [parts[0]] if parts else [alias.name for alias in node.names]
                internal.update(names)
            elif node.module.startswith("custom_llm"):
                internal.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
            else:
                external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    return internal - {layer}, external


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_the_design_allows(layer):
    problems = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        internal, external = imports_of(path, layer)
        for name in sorted(internal - ALLOWED[layer]):
            problems.append(f"{path.relative_to(PACKAGE)} imports custom_llm.{name}")
        if layer in NO_TORCH and "torch" in external:
            problems.append(f"{path.relative_to(PACKAGE)} imports torch")
    assert not problems, problems
