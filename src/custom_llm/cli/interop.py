"""``custom-llm export`` and ``custom-llm import``: thin wrappers over :mod:`custom_llm.interop`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add the ``export`` and ``import`` sub-commands."""
    export = sub.add_parser("export", help="export a checkpoint to the Hugging Face format",
                            description="Write a Hugging Face model folder (Llama, Mistral, Mixtral or Qwen2-MoE, "
                                        "chosen from the model) that transformers loads with no custom code.")
    export.add_argument("--ckpt", required=True, help="checkpoint directory (or run directory: its newest checkpoint)")
    export.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="output format: hf (a model folder) or gguf (one file for llama.cpp) (default: hf)")
    export.add_argument("--out", required=True, help="output folder (must not exist or be empty); for gguf the file")
    export.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="gguf weight type (default: f16)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight dtype of the export (default: the checkpoint's)")
    export.add_argument("--merge-lora", action="store_true",
                        help="a LoRA fine-tune: fold the adapter into the weights (default: export the base model "
                             "and the adapter in OUT/adapter, PEFT's format)")
    export.set_defaults(func=run_export)

    imp = sub.add_parser("import", help="import a Hugging Face model folder as a checkpoint",
                         description="Turn a Hugging Face model folder (Llama, Mistral, Mixtral or Qwen2-MoE) into "
                                     "a custom-llm checkpoint, tokenizer included.")
    imp.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write (must not exist or be empty)")
    imp.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from ..interop.gguf import export_gguf

        print(f"exported to {export_gguf(args.ckpt, args.out, quant=args.quant)}")
        return 0
    from ..checkpoint_io import resolve_checkpoint_dir
    from ..interop import export_hf
    from ..interop.peft import export_lora_checkpoint, is_lora_checkpoint

    ckpt = resolve_checkpoint_dir(args.ckpt)
    if is_lora_checkpoint(ckpt):  # a LoRA fine-tune (custom-llm finetune --lora.r ...)
        out = export_lora_checkpoint(ckpt, args.out, merge=args.merge_lora, dtype=args.dtype)
    else:
        out = export_hf(args.ckpt, args.out, dtype=args.dtype)
    print(f"exported to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..interop import import_hf

    out = import_hf(args.hf, args.out)
    print(f"imported into {out}")
    return 0
