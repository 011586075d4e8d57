"""``custom-llm consolidate``: write the full ``model.safetensors`` of a sharded (FSDP) checkpoint."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path


def register(sub) -> None:
    """Add the ``consolidate`` sub-command."""
    parser = sub.add_parser("consolidate", help="write model.safetensors for a sharded (FSDP) checkpoint",
                            description="Read a checkpoint's DCP folder (any number of ranks' shards) in this one "
                                        "process and write the full weights as model.safetensors: into the "
                                        "checkpoint itself, or into a new checkpoint folder with --out (config and "
                                        "tokenizer copied, no optimizer state). Every reader already accepts the "
                                        "sharded form; this is for tools outside custom-llm.")
    parser.add_argument("ckpt", help="checkpoint directory (or run directory: its newest checkpoint)")
    parser.add_argument("--out", default=None, help="new checkpoint folder to write (must not exist or be empty)")
    parser.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ..checkpoint_io import WEIGHTS_FILE, load_checkpoint_model, model_state_for_saving, resolve_checkpoint_dir
    from ..dcp_io import DCP_DIR, is_sharded
    from ..errors import UserError

    ckpt = resolve_checkpoint_dir(Path(args.ckpt))
    if not is_sharded(ckpt):
        raise UserError(f"{ckpt} is not a sharded checkpoint (no {DCP_DIR}/ folder); its {WEIGHTS_FILE} is already whole")
    state = model_state_for_saving(load_checkpoint_model(ckpt))
    target = ckpt
    if args.out is not None:
        target = Path(args.out)
        if target.exists() and any(target.iterdir()):
            raise UserError(f"--out {target} exists and is not empty")
        target.mkdir(parents=True, exist_ok=True)
        for path in ckpt.iterdir():  # config.json, tokenizer files; not the trainer or optimizer state
            if path.is_file() and path.name not in ("trainer_state.json", WEIGHTS_FILE):
                shutil.copy2(path, target / path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_FILE}.", suffix=".tmp", dir=target)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, target / WEIGHTS_FILE)  # readers see the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {target / WEIGHTS_FILE} ({sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return 0
