"""``custom-llm quantize``: write an int8 / int4 weight-only copy of a checkpoint (see generation/quant.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    """Add the ``quantize`` sub-command."""
    from ..generation.quant import GROUP_SIZES, MODES

    q = sub.add_parser("quantize", help="quantize a checkpoint's weights to int8 or int4",
                       description="Write a checkpoint with int8 (per output channel) or int4 (groups of "
                                   "--group-size input columns) weights for the attention, MLP and expert "
                                   "projections and the LM head; the embedding, norms and routers stay float. "
                                   "Every command that takes --ckpt loads the result.")
    q.add_argument("--ckpt", required=True, help="checkpoint directory, run directory or Hugging Face model folder")
    q.add_argument("--mode", required=True, choices=MODES, help="int8 or int4")
    q.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES,
                   help="int4: input columns sharing one scale and zero (default 32)")
    q.add_argument("--keep-head", action="store_true", help="leave the LM head in float")
    q.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    q.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from ..api import load_model, load_tokenizer
    from ..generation.quant import quantize_model
    from ..generation.quant_io import quantization_of, save_quantized

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    if not Path(args.ckpt).exists():
        raise UserError(f"checkpoint not found: {args.ckpt}")
    if Path(args.ckpt).is_dir() and quantization_of(Path(args.ckpt)):
        raise UserError(f"{args.ckpt} is already quantized; quantize the float checkpoint")
    model = load_model(args.ckpt)
    tokenizer = load_tokenizer(args.ckpt)
    quantize_model(model, args.mode, args.group_size, head=not args.keep_head, kernel="reference")
    save_quantized(model, out)
    tokenizer.save(out)
    print(f"wrote {args.mode} checkpoint to {out}")
    return 0
