"""Sharded training checkpoints: every rank writes its own model and optimizer shards with DCP.

The layout is dcp_io.py's (a pickle-free DCP folder of safetensors files plus ``index.json``) beside
the files every checkpoint has (config.json, trainer_state.json, the tokenizer). The save is as
atomic as the single-file one: all ranks write into ``.ckpt-<step>.tmp-sharded``; once DCP's save
returns (it ends with a collective, so every rank's file is written) rank 0 adds the index and the
JSON files, fsyncs the tree and renames it to ``ckpt-<step>``. A rank killed mid-save leaves only the
temporary folder, which ``--resume`` deletes.

Loading goes through ``torch.distributed.checkpoint.state_dict``, which speaks FQN-keyed state for
sharded and plain models alike, so a checkpoint saved by W ranks resumes on any other number of
ranks (DCP reads the overlap of each saved shard with each rank's new shard).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..checkpoint_io import (CONFIG_FILE, DCP_DIR, INDEX_FILE, MODEL_PREFIX, OPTIM_PREFIX, read_index,
                             write_json)
from ..errors import UserError
from .checkpoint import STATE_FILE, TMP_PREFIX, publish
from .distributed import Runtime, all_reduce_sum, barrier


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """(flat name -> tensor for DCP, the model's state dict, the optimizer's FQN-keyed state dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model)
    if getattr(model.config, "tie_embeddings", False):
        model_state.pop("lm_head.weight", None)  # stored once, as the embedding
    optim_state = get_optimizer_state_dict(model, optimizer)  # allocates the state of a fresh optimizer
    tensors = {MODEL_PREFIX + name: t for name, t in model_state.items()}
    for fqn, entry in optim_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{fqn}.{key}"] = value
    return tensors, model_state, optim_state


def _optimizer_json(optim_state: dict) -> dict:
    """The optimizer state that is not a tensor: per-parameter scalars and the parameter groups."""
    scalars = {fqn: {k: v for k, v in entry.items() if not torch.is_tensor(v)} for fqn, entry in optim_state["state"].items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optim_state["param_groups"]]
    return {"scalars": {k: v for k, v in scalars.items() if v}, "param_groups": groups}


def _locally_finite(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            return False
    return True


def weights_finite_everywhere(model: torch.nn.Module, rt: Runtime) -> bool:
    """True when no rank's parameters (or shards) hold a NaN or an infinity; every rank gets the same answer."""
    bad = torch.tensor(0.0 if _locally_finite(model) else 1.0, device=rt.device)
    return float(all_reduce_sum(bad, rt)) == 0.0


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scaler_state: dict, trainer_state: dict, config: dict, tokenizer: Any, keep: int,
                            rt: Runtime) -> Path:
    """Write ``run_dir/ckpt-<step>`` from every rank (called by all of them; ``trainer_state`` is rank 0's)."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    run_dir = Path(run_dir)
    tmp = run_dir / f"{TMP_PREFIX}{step}.tmp-sharded"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / DCP_DIR).mkdir(parents=True)
    barrier(rt)
    tensors, _, optim_state = _state_tensors(model, optimizer)
    with _quiet_single_process():
        save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True),
             no_dist=not rt.distributed)
    barrier(rt)
    final = run_dir / f"ckpt-{step}"
    if rt.is_main:
        files = {p.name: p.stat().st_size for p in sorted((tmp / DCP_DIR).iterdir()) if p.suffix == ".safetensors"}
        write_json(tmp / DCP_DIR / INDEX_FILE, {"world_size": rt.world_size, "files": files,
                                                "optimizer": _optimizer_json(optim_state), "scaler": scaler_state})
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / STATE_FILE, trainer_state)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _fsync_recursive(tmp)
        publish(tmp, run_dir, step, keep)
    barrier(rt)
    return final


def load_sharded_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint's model and optimizer into this run's (sharded or plain) ones, whatever
    the world size that saved it; returns the saved gradient-scaler state."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    index = read_index(directory)
    tensors, model_state, optim_state = _state_tensors(model, optimizer)
    try:
        with _quiet_single_process():
            load(tensors, storage_reader=HuggingFaceStorageReader(str(Path(directory) / DCP_DIR)),
                 no_dist=not dist.is_initialized())
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot resume from {directory}: {first}") from None
    model_state = {name: tensors[MODEL_PREFIX + name] for name in model_state}
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=False))
    saved = index["optimizer"]
    state = {fqn: {key: tensors[f"{OPTIM_PREFIX}{fqn}.{key}"] for key, value in entry.items() if torch.is_tensor(value)}
             for fqn, entry in optim_state["state"].items()}
    for fqn, entry in saved["scalars"].items():
        state.setdefault(fqn, {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})
    return index.get("scaler", {})


def refuse_full_into_sharded(directory: Path, tc: Any, rt: Runtime) -> None:
    """A UserError when a sharded (multi-rank FSDP) run would resume from a single-file checkpoint."""
    if tc.parallel == "fsdp" and rt.distributed:
        raise UserError(f"{directory} was saved by a train.parallel ddp run (model.safetensors); resume it with "
                        "--train.parallel ddp, or on one rank with fsdp, whose next checkpoint is sharded")


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns when it runs without a process group; on one rank that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _fsync_recursive(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
