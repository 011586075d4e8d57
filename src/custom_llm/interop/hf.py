"""Export to and import from Hugging Face model folders (Llama, Mistral, Mixtral, Qwen2-MoE).

* :func:`export_hf` writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
  tokenizer files, so that ``transformers.AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` load the folder with no custom code.
* :func:`load_hf_model` builds our :class:`Transformer` straight from such a folder (also used by
  ``custom_llm.load_model``); :func:`import_hf` saves it as a project checkpoint.

The files are read and written with ``safetensors`` and ``json`` only: transformers is not needed.
Both writers build the output in a temporary sibling folder and rename it into place at the end, so a
failure leaves nothing behind. See :mod:`.hf_config` for which model maps to which architecture and
:mod:`.hf_weights` for the tensor names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..checkpoint_io import (CONFIG_FILE, WEIGHTS_FILE, build_model, load_checkpoint_model, parameter_shapes, read_json,
                             resolve_checkpoint_dir, save_model, write_json)
from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import disk_full_is_user_error
from .hf_config import choose_architecture, hf_config_to_model_config, model_config_to_hf_config
from .hf_tokenizer import export_tokenizer, import_tokenizer
from .hf_weights import from_hf_state, read_hf_tensors, to_hf_state

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(folder: Path) -> tuple[dict, ModelConfig]:
    """(HF config dict, our ModelConfig) of an HF model folder."""
    path = Path(folder) / CONFIG_FILE
    hf = read_json(path)
    return hf, hf_config_to_model_config(hf, source=str(path))


def load_hf_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                  dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Our Transformer with the weights of an HF folder of a supported architecture (eval mode)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"Hugging Face model folder not found: {folder}")
    hf, config = read_hf_config(folder)
    state = from_hf_state(read_hf_tensors(folder), config, hf["model_type"], parameter_shapes(config), str(folder))
    return build_model(config, state, str(folder), device, dtype)


@contextmanager
def _staged_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that becomes ``out_dir`` on success and vanishes on failure."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} is an existing file; give a folder path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with disk_full_is_user_error(out_dir, f"nothing was written to {out_dir}"):
            yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_source(source: Union[str, Path, torch.nn.Module], tokenizer) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer or None) from a checkpoint/run directory or an in-memory model."""
    if isinstance(source, torch.nn.Module):
        return source, tokenizer
    ckpt = resolve_checkpoint_dir(Path(source))
    model = load_checkpoint_model(ckpt)
    if tokenizer is None and (ckpt / "tokenizer.json").is_file():
        from ..tokenizers import load_tokenizer

        tokenizer = load_tokenizer(ckpt)
    return model, tokenizer


def export_hf(source: Union[str, Path, torch.nn.Module], out_dir: Union[str, Path], tokenizer=None,
              dtype: Optional[str] = None) -> Path:
    """Write an HF model folder for a checkpoint (or run directory, or model); returns ``out_dir``.

    ``tokenizer`` defaults to the checkpoint's own; ``dtype`` ('float32', 'bfloat16', 'float16')
    defaults to the weights' dtype. Raises UserError for a model no supported architecture represents.
    """
    from safetensors.torch import save_file

    model, tokenizer = _load_source(source, tokenizer)
    config: ModelConfig = model.config
    choose_architecture(config)  # refuse before touching the disk
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    target = DTYPES[dtype] if dtype else model.embed_tokens.weight.dtype
    dtype_name = next((k for k, v in DTYPES.items() if v == target), "float32")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    special = tokenizer.special_ids() if tokenizer is not None else {}
    special = {k: v for k, v in special.items() if v is not None and v >= 0}
    hf_config = model_config_to_hf_config(config, special, dtype_name)
    state = {name: t.detach().float() for name, t in model.state_dict().items()}  # fold ReZero in fp32
    tensors = {name: t.to(target).contiguous() for name, t in to_hf_state(state, config, hf_config["model_type"]).items()}
    out_dir = Path(out_dir)
    with _staged_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, hf_config)
        generation = {k + "_token_id": special[k] for k in ("bos", "eos", "pad") if k in special}
        write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            export_tokenizer(tokenizer, tmp, config.max_seq_len)
        else:
            log.warning("no tokenizer: the exported folder has none (AutoTokenizer will not load it)")
    log.debug("exported %s (%s) to %s", hf_config["architectures"][0], dtype_name, out_dir)  # the CLI prints it
    return out_dir


def import_hf(hf_dir: Union[str, Path], out_ckpt_dir: Union[str, Path]) -> Path:
    """Turn an HF model folder into a project checkpoint (fp32 weights, config, tokenizer)."""
    hf_dir = Path(hf_dir)
    model = load_hf_model(hf_dir)
    out = Path(out_ckpt_dir)
    with _staged_dir(out) as tmp:
        save_model(model, tmp, extra_config={"imported_from": str(hf_dir.resolve())})
        if not import_tokenizer(hf_dir, tmp):
            log.warning("%s has no tokenizer.json: the checkpoint has no tokenizer", hf_dir)
    log.debug("imported %s into %s", hf_dir, out)  # the CLI prints the result
    return out
