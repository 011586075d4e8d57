"""Reading and writing model weights and configs as safetensors + JSON (never pickle).

A checkpoint directory holds ``config.json`` (``{"format": "custom-llm", "model": {...}, "train": {...}}``)
and ``model.safetensors``; the training package adds its own state files beside them. Tied embeddings
are stored once (``lm_head.weight`` is left out and re-tied on load).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import ModelConfig
from .dcp_io import (DCP_DIR, INDEX_FILE, MODEL_PREFIX, OPTIM_PREFIX, consolidated_model_state,  # noqa: F401
                     dcp_problem, is_sharded, read_index)  # the sharded-checkpoint names, re-exported to training
from .errors import UserError
from .fsutil import write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARDED_FILES = (WEIGHTS_FILE, "optimizer.safetensors")
"""Files whose tensors a sharded (FSDP) checkpoint keeps in its DCP folder instead (see dcp_io.py)."""
CKPT_PATTERN = re.compile(r"^ckpt-(\d+)$")
log = logging.getLogger("custom_llm")


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or malformed file into a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed JSON in {path}: {exc}") from None


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a flat dict, tied LM head left out, each tensor contiguous on the CPU."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: t.detach().contiguous().cpu() for name, t in state.items()}


def save_model(model: torch.nn.Module, directory: Path, extra_config: Optional[dict] = None) -> None:
    """Write config.json and model.safetensors for ``model`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, {"format": "custom-llm", "model": model.config.to_dict(), **(extra_config or {})})


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; a missing, unexpected or mis-shaped tensor is a UserError naming it."""
    expected = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def read_model_config(directory: Path) -> ModelConfig:
    """The ModelConfig stored in a checkpoint directory's config.json."""
    data = read_json(Path(directory) / CONFIG_FILE)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{Path(directory) / CONFIG_FILE} is not a custom-llm checkpoint config (no 'model' section)")
    return ModelConfig.from_dict(data["model"])


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a model's state dict, from a model built on the meta device."""
    from .model import Transformer

    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The one way to build a model from stored weights (every loader uses it), in eval mode.

    The model is built on the meta device (no initialisation cost), given empty CPU storage, and
    filled from ``state`` (names and shapes checked; ``source`` names it in errors). Buffers that
    are not stored (RoPE's inverse frequencies) are computed afresh.
    """
    from .model import Transformer
    from .model.rope import RotaryEmbedding

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.rope.inv_freq.copy_(RotaryEmbedding(config.resolved_head_dim, config.rope_theta).inv_freq)
    load_state_into(model, state, source)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def load_checkpoint_model(directory: Path, device: str | torch.device = "cpu",
                          dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Build the model described by a checkpoint directory and load its weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_model_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and is_sharded(directory):  # an FSDP run's checkpoint: consolidate its DCP folder
        return build_model(config, sharded_model_state(directory, config), str(directory / DCP_DIR), device, dtype)
    if not weights.is_file():
        raise UserError(f"missing file: {weights}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"cannot read {weights}: {exc}") from None
    return build_model(config, state, str(weights), device, dtype)


def sharded_model_state(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model in a checkpoint's DCP folder (tied LM head left out, as in model.safetensors)."""
    from .model import Transformer

    with torch.device("meta"):
        reference = Transformer(config).state_dict()
    if config.tie_embeddings:
        reference.pop("lm_head.weight", None)
    return consolidated_model_state(directory, {n: tuple(t.shape) for n, t in reference.items()},
                                    {n: t.dtype for n, t in reference.items()})


def file_problem(path: Path) -> Optional[str]:
    """What is wrong with one checkpoint file, or None: missing, empty, a JSON file that does not parse
    to an object, a safetensors file whose header does not parse or whose data is cut short."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return None if isinstance(data, dict) and data else f"{path.name} holds no JSON object"
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if size < 8 or header_len > size - 8:
                    return f"{path.name} is truncated (no complete header)"
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return None if 8 + header_len + end <= size else f"{path.name} is truncated ({size} bytes)"
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__})"
    return None if size > 0 else f"{path.name} is empty"


def checkpoint_problem(directory: Path, files: Sequence[str] = (CONFIG_FILE, WEIGHTS_FILE)) -> Optional[str]:
    """The first problem of ``files`` in a checkpoint directory (see :func:`file_problem`), or None.
    In a sharded checkpoint the DCP folder stands for the weights and optimizer files."""
    if is_sharded(directory):
        files = [name for name in files if name not in SHARDED_FILES]
        problem = dcp_problem(directory)
        if problem is not None:
            return problem
    for name in files:
        problem = file_problem(Path(directory) / name)
        if problem is not None:
            return problem
    return None


def list_checkpoints(run_dir: Path, files: Sequence[str] = (CONFIG_FILE, WEIGHTS_FILE)) -> list[Path]:
    """``ckpt-<step>`` directories of a run whose ``files`` are all whole, oldest first.

    The one test of a complete checkpoint: readers need the config and weights, a resume adds the
    trainer and optimizer state (training.checkpoint). A newer checkpoint that fails it is skipped
    with a warning that says what is wrong with it; temporary leftovers of a save are ignored.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CKPT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    complete, skipped = [], []
    for _, path in sorted(found):
        problem = checkpoint_problem(path, files)
        if problem is None:
            complete.append(path)
        else:
            skipped.append((path, problem))
    for path, problem in skipped:
        newest = complete[-1] if complete else None
        if (path, problem) not in _WARNED and (newest is None or _step(path) > _step(newest)):
            _WARNED.add((path, problem))
            using = f"using {newest.name}, the newest complete checkpoint" if newest else "no complete checkpoint"
            log.warning("skipping %s: %s; %s", path, problem, using)
    return complete


_WARNED: set = set()  # (checkpoint, problem) pairs already reported by this process


def _step(path: Path) -> int:
    return int(CKPT_PATTERN.match(path.name).group(1))


def resolve_checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint inside a run directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"no checkpoint in {path} (expected config.json or ckpt-<step>/ folders)")
    return checkpoints[-1]
