"""Training checkpoints: atomic ``ckpt-<step>/`` directories that hold everything needed for exact resume.

Layout (see DESIGN.md)::

    ckpt-<step>/config.json            {"format": "custom-llm", "model": {...}, "train": {...}}
    ckpt-<step>/model.safetensors      fp32 master weights (tied LM head stored once)
    ckpt-<step>/tokenizer.json         when the run has a tokenizer
    ckpt-<step>/trainer_state.json     step, tokens, RNG states, data position, curriculum, metric history
    ckpt-<step>/optimizer.safetensors  optimizer tensors; its non-tensor state and the gradient scaler
                                       are JSON in the file's metadata under "json"

A checkpoint is written into ``.ckpt-<step>.tmp-XXXX``, every file and the directory fsynced, then
renamed: a directory named ``ckpt-<step>`` is always complete. Nothing here pickles.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint_io import (CONFIG_FILE, WEIGHTS_FILE, list_checkpoints, load_state_into, read_json, save_model,
                             write_json)
from ..errors import UserError
from ..fsutil import disk_full_is_user_error

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TMP_PREFIX = ".ckpt-"


# --- optimizer state <-> (tensors, JSON) --------------------------------------------------------

def flatten_optimizer_state(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors named ``state.<param>.<key>`` and a JSON-ready rest."""
    tensors, scalars = {}, {}
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optimizer_state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, entry in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- RNG states as JSON ---------------------------------------------------------------------------

def encode_bytes(tensor: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text."""
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(text: str) -> torch.Tensor:
    """Inverse of :func:`encode_bytes`."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Torch CPU (and CUDA) generator states."""
    state = {"torch_cpu": encode_bytes(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(decode_bytes(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_bytes(s) for s in state["torch_cuda"]])


# --- writing -------------------------------------------------------------------------------------

def weights_are_finite(model: torch.nn.Module) -> bool:
    """True when no parameter holds a NaN or an infinity."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler_state: dict, trainer_state: dict, config: dict, tokenizer: Any = None,
                    keep: int = 3) -> Path:
    """Write ``run_dir/ckpt-<step>`` atomically, then delete all but the newest ``keep`` checkpoints.

    Refuses (UserError) to write weights that are not finite.
    """
    from safetensors.torch import save_file

    if not weights_are_finite(model):
        raise UserError(f"refusing to save checkpoint at step {step}: the weights contain NaN or infinity")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}.tmp-", dir=run_dir))
    last = latest_checkpoint(run_dir)
    kept = f"the last complete checkpoint, {last.name}, is intact" if last else "no earlier checkpoint exists"
    try:
        with disk_full_is_user_error(run_dir, f"checkpoint {step} was not written and {kept}"):
            save_model(model, tmp, extra_config={k: v for k, v in config.items() if k not in ("format", "model")})
            tensors, rest = flatten_optimizer_state(optimizer.state_dict())
            meta = {"json": json.dumps({"optimizer": rest, "scaler": scaler_state})}
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=meta)
            write_json(tmp / STATE_FILE, trainer_state)
            if tokenizer is not None:
                tokenizer.save(tmp)
            _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # half a checkpoint never stays behind
        raise
    return publish(tmp, run_dir, step, keep)


def publish(tmp: Path, run_dir: Path, step: int, keep: int) -> Path:
    """Rename a finished, fsynced temporary directory to ``run_dir/ckpt-<step>``, then keep the newest ``keep``."""
    final = run_dir / f"ckpt-{step}"
    if final.exists():  # re-saving a step (a resumed run ending where it started): swap, then drop the old one
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}.old-", dir=run_dir))
        os.replace(final, old / "ckpt")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)
    for stale in list_complete(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_leftovers(run_dir: Path) -> None:
    """Delete temporary directories left by an interrupted save."""
    for child in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(child, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------------

RESUME_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, OPTIMIZER_FILE)


def list_complete(run_dir: Path) -> list[Path]:
    """Checkpoints of a run whose every resume file is whole, oldest first."""
    return list_checkpoints(run_dir, RESUME_FILES)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = list_complete(run_dir)
    return found[-1] if found else None


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load ``directory/model.safetensors`` into ``model`` (shapes and names checked)."""
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for missing/corrupt files
        raise UserError(f"cannot read {path}: {exc}") from None
    load_state_into(model, state, str(path))


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Load the optimizer state saved in ``directory``; returns the saved gradient-scaler state."""
    from safetensors import safe_open

    path = Path(directory) / OPTIMIZER_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(f.metadata()["json"])
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    return meta["scaler"]


def load_trainer_state(directory: Path) -> dict:
    """The trainer_state.json of a checkpoint."""
    return read_json(Path(directory) / STATE_FILE)

