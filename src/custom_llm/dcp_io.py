"""The DCP folder of a sharded (FSDP) checkpoint: its layout, its completeness test, and a reader that
consolidates it into full tensors in one process. Nothing here pickles.

An FSDP run saves model and optimizer tensors with ``torch.distributed.checkpoint`` (DCP) through its
safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)``): every rank writes one file
holding its own shards, each shard's offsets in the file's metadata. DCP's reader rebuilds the global
layout from those headers, so the folder loads onto any world size (resharding) or into plain full
tensors, and, unlike DCP's default writer, whose ``.metadata`` file is a pickle, nothing is pickled.
Rank 0 writes ``index.json`` once every rank has finished::

    ckpt-<step>/dcp/index.json        {"world_size": W, "files": {file name: bytes}, "optimizer": {...}}
    ckpt-<step>/dcp/shard-*.safetensors  tensors "model.<name>" and "optim.<name>.<key>" (this rank's shards)

The folder is complete when ``index.json`` parses and every file it lists is there, whole.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

DCP_DIR = "dcp"
INDEX_FILE = "index.json"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def is_sharded(directory: Path) -> bool:
    """Whether a checkpoint directory keeps its tensors in a DCP folder."""
    return (Path(directory) / DCP_DIR).is_dir()


def read_index(directory: Path) -> dict:
    """The DCP folder's ``index.json`` (a UserError naming it when missing or malformed)."""
    path = Path(directory) / DCP_DIR / INDEX_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise UserError(f"{path} is not a DCP index (no 'files')")
    return data


def dcp_problem(directory: Path) -> Optional[str]:
    """What is wrong with a checkpoint's DCP folder, or None: no index, a listed file missing or cut short."""
    try:
        index = read_index(directory)
    except UserError:
        return f"{DCP_DIR}/{INDEX_FILE} is missing or unreadable"
    for name, size in index["files"].items():
        path = Path(directory) / DCP_DIR / name
        if not path.is_file():
            return f"{DCP_DIR}/{name} is missing"
        if path.stat().st_size != size:
            return f"{DCP_DIR}/{name} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def load_full_state(directory: Path, template: dict[str, torch.Tensor], prefix: str = MODEL_PREFIX) -> None:
    """Fill ``template`` (name -> full-size tensor, e.g. a freshly built model's state dict) from the DCP
    folder in this one process: DCP reads every rank's shards into place (no process group needed)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    folder = Path(directory) / DCP_DIR
    problem = dcp_problem(directory)
    if problem is not None:
        raise UserError(f"{directory}: {problem}")
    keyed = {prefix + name: tensor for name, tensor in template.items()}
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            load(keyed, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {folder} into this model: {first}") from None


def consolidated_model_state(directory: Path, shapes: dict[str, tuple[int, ...]],
                             dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Full CPU tensors (name -> shape, dtype as given) of the model saved in a DCP folder."""
    template = {name: torch.empty(shape, dtype=dtypes[name]) for name, shape in shapes.items()}
    load_full_state(directory, template)
    return template
