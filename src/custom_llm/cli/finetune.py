"""``custom-llm finetune``: supervised fine-tuning on conversations, full or with LoRA adapters.

Flags -> :func:`custom_llm.training.sft.run_sft`. ``--init`` is a run, a checkpoint or a Hugging Face
folder (default ``runs/tiny``, what ``custom-llm train`` writes with no arguments); ``--data`` a JSONL
file of ``{"messages": [...]}`` lines or ``hf:NAME``, by default the stdlib conversations. Every
training field is a flag too (``--train.FIELD VALUE``). A LoRA run's last checkpoint also gets the
adapter in PEFT's format; ``custom-llm chat --ckpt OUT`` talks to the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..errors import ConfigError, UserError

DEFAULT_INIT, DEFAULT_OUT = "runs/tiny", "runs/sft"
SAMPLE_QUESTIONS = ("What does json.dumps do?", "Explain os.path.join.", "What is shutil.copyfile for?")
LORA_FLAGS = ("r", "alpha", "dropout", "targets")
# Pre-training fields with no meaning here (the data, its tokenizer, the curriculum, the row length).
NOT_FOR_FINETUNING = {"data", "tokenizer", "text_field", "extensions", "cache_dir", "seq_len", "curriculum",
                      "curriculum_patience", "curriculum_threshold", "curriculum_lr_rule", "sample_tokens"}


def register(sub) -> None:
    """Add the ``finetune`` sub-command."""
    from ..config import field_docs
    from ..model.lora import LoRAConfig
    from ..training.config import DEVICES, PRECISIONS, TrainConfig, dataclass_fields
    from ..training.sft import SFTConfig

    sft_docs, lora_docs = field_docs(SFTConfig), field_docs(LoRAConfig)
    p = sub.add_parser("finetune", help="fine-tune a model on conversations (full or LoRA)",
                       description="Supervised fine-tuning on chat conversations: the loss covers the assistant's "
                                   "tokens and their end-of-turn token only. With no arguments it fine-tunes "
                                   f"{DEFAULT_INIT} (what `custom-llm train` writes) on conversations built from "
                                   f"the standard library's docstrings into {DEFAULT_OUT}.")
    p.add_argument("--init", default=None, metavar="PATH",
                   help=f"run, checkpoint or Hugging Face folder to start from (default {DEFAULT_INIT})")
    p.add_argument("--data", default=None, metavar="PATH", help=sft_docs["data"])
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--epochs", type=float, default=2.0, help=sft_docs["epochs"] + " (default 2)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: from --epochs)")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row instead of packing")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in backward: less activation memory for some time (with --lora, "
                        "weights then dominate the step's memory; see bench lora_memory)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen model (implied by --lora.*)")
    for name in LORA_FLAGS:
        p.add_argument(f"--lora.{name}", dest=f"lora.{name}", default=None, metavar="VALUE",
                       help=lora_docs[name] + (" (comma-separated)" if name == "targets" else ""))
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop (and save) after this long")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="questions to answer with the fine-tuned model at the end (default 3)")
    group = p.add_argument_group("train config fields")
    docs = field_docs(TrainConfig)
    for name in (n for n in dataclass_fields(TrainConfig) if n not in NOT_FOR_FINETUNING):
        group.add_argument(f"--train.{name}", dest=f"train.{name}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=docs.get(name, "").replace("%", "%%"))
    p.set_defaults(func=run_finetune)


def lora_config(args: argparse.Namespace):
    """The LoRAConfig of --lora / --lora.* (None: full fine-tuning)."""
    from ..model.lora import LoRAConfig

    given = {name: getattr(args, f"lora.{name}") for name in LORA_FLAGS if getattr(args, f"lora.{name}") is not None}
    if not args.lora and not given:
        return None
    try:
        values = {k: (v if k == "targets" else (int(v) if k == "r" else float(v))) for k, v in given.items()}
        return LoRAConfig(**values)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("invalid literal", "--lora: invalid value")) from None


def train_overrides(args: argparse.Namespace) -> dict:
    """Typed train.* values from the flags (only those given)."""
    from ..config import parse_field_value
    from ..training.config import TrainConfig, dataclass_fields

    out, problems = {}, []
    for name in (n for n in dataclass_fields(TrainConfig) if n not in NOT_FOR_FINETUNING):
        text = getattr(args, f"train.{name}", None)
        if text is not None:
            try:
                out[name] = parse_field_value(TrainConfig, name, text, "train.")
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    for flag, name in (("device", "device"), ("precision", "precision"), ("time_limit", "time_limit"),
                       ("max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            out[name] = getattr(args, flag)
    return out


def run_finetune(args: argparse.Namespace) -> int:
    from ..api import load_model, load_tokenizer
    from ..training.sft import SFTConfig, run_sft

    init = args.init or DEFAULT_INIT
    if not Path(init).exists():
        hint = " (train one first: custom-llm train)" if args.init is None else ""
        raise UserError(f"--init {init}: not found{hint}")
    lora = lora_config(args)
    overrides = train_overrides(args)
    sft = SFTConfig(data=args.data, packing=not args.no_packing, epochs=args.epochs)
    if sft.epochs <= 0:
        raise UserError(f"--epochs must be > 0 (got {args.epochs})")
    model, tokenizer = load_model(init), load_tokenizer(init)
    if args.grad_checkpointing:
        model.config = dataclasses.replace(model.config, grad_checkpointing=True)
    result = run_sft(model, tokenizer, sft, overrides, Path(args.out), lora=lora, resume=args.resume,
                     progress=not args.no_progress, init=str(init))
    run = result.train
    if int(os.environ.get("RANK", "0")) != 0 or run.checkpoint is None or not run.checkpoint.is_dir():
        return 0
    if lora is not None:
        from ..interop.peft import save_adapter

        save_adapter(result.model, lora, run.checkpoint, base_model_name_or_path=str(init))
    val = f"{run.val_loss:.4f}" if run.val_loss is not None else "-"
    print(f"fine-tuned {init} -> {run.checkpoint} ({run.step} steps, validation loss on answers {val})")
    _print_samples(run.checkpoint, args.data, args.samples)
    print(f"talk to it: custom-llm chat --ckpt {args.out}")
    return 0


def _print_samples(checkpoint: Path, data, count: int) -> None:
    """A few questions and the fine-tuned model's greedy answers (from held-out style prompts)."""
    import torch

    from ..api import load_model, load_tokenizer
    from ..data.chat import read_conversations
    from ..generation import Engine

    if data is None:
        questions = list(SAMPLE_QUESTIONS)[:count]
    else:
        questions = [m[0]["content"] for _, m in read_conversations(data)
                     if isinstance(m, list) and m and isinstance(m[0], dict) and m[0].get("role") == "user"][:count]
    if not questions:
        return
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    engine, stop = Engine(model), tokenizer.stop_ids
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        room = model.config.max_seq_len - len(ids)
        if room < 1:
            continue
        answer = []
        with torch.no_grad():
            for token in engine.stream([ids], min(room, 80)):
                if int(token[0]) in stop:
                    break
                answer.append(int(token[0]))
        print(f"  Q: {question}\n  A: {tokenizer.decode(answer)}")
    sys.stdout.flush()
