"""``custom-llm train``: flags -> :func:`custom_llm.training.run.resolve_job` -> :func:`run_job`.

Besides the named flags, every config field is a flag: ``--model.FIELD VALUE`` and
``--train.FIELD VALUE``, generated from the dataclasses with their declared docs as help.
"""

from __future__ import annotations

import argparse

from ..config import ModelConfig, field_docs, parse_field_value
from ..errors import ConfigError
from ..training.config import DEVICES, PRECISIONS, RUN_PRESETS, TOKENIZER_KINDS, TrainConfig, dataclass_fields

DESCRIPTION = """Train a model. Config sources, later winning: --preset (default 'tiny' when no --config is
given) < --config FILE (YAML/JSON with 'model' and 'train' sections) < flags. With no arguments it trains
the 'tiny' preset on the embedded default corpus (Python's standard library sources) into runs/tiny."""

# Named flags that are shortcuts for train.* fields.
SHORTCUTS = {"data": "data", "max_steps": "max_steps", "save_every": "save_every", "time_limit": "time_limit",
             "precision": "precision", "device": "device", "tokenizer": "tokenizer"}


def register(sub) -> None:
    parser = sub.add_parser("train", help="train a model", description=DESCRIPTION)
    parser.add_argument("--config", metavar="FILE", help="run config (YAML or JSON) with 'model' and 'train' sections")
    parser.add_argument("--preset", choices=RUN_PRESETS, help="model preset plus matching train defaults")
    parser.add_argument("--data", nargs="+", metavar="PATH", help="text files, directories or .jsonl files "
                        "(default: the embedded corpus of Python's standard library sources)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: runs/<preset or config name>)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps; the LR schedule spans them")
    parser.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (and at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--init", metavar="CKPT", help="start from these weights (a checkpoint or Hugging Face "
                        "folder) with a fresh optimizer")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop (and save) after this long")
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, help="tokenizer kind to train on the data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A ``--model.FIELD`` / ``--train.FIELD`` flag for every config field, its declared doc as help."""
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        group = parser.add_argument_group(f"{section} config fields")
        docs = field_docs(cls)
        for name in dataclass_fields(cls):
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", metavar="VALUE",
                               default=argparse.SUPPRESS, help=docs.get(name, "").replace("%", "%%"))


def collect_overrides(args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """Typed {"model": {...}, "train": {...}} from the flags, and the problems of unparsable values."""
    overrides: dict[str, dict] = {"model": {}, "train": {}}
    problems = []
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for name in dataclass_fields(cls):
            text = getattr(args, f"{section}.{name}", None)
            if text is None:
                continue
            try:
                overrides[section][name] = parse_field_value(cls, name, text, f"{section}.")
            except ConfigError as exc:
                problems.append(str(exc))
    for flag, name in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides["train"][name] = value
    return overrides, problems


def run(args: argparse.Namespace) -> int:
    from ..training.run import resolve_job, run_job

    overrides, problems = collect_overrides(args)
    try:
        job = resolve_job(args.preset, args.config, overrides, args.out, args.resume, args.init)
    except ConfigError as exc:
        raise ConfigError("; ".join(problems + [str(exc)])) from None
    if problems:
        raise ConfigError("; ".join(problems))
    init = load_init(job.init) if job.init is not None else None
    run_job(job, progress=not args.no_progress, init=init, sample=sample_text)
    return 0


def load_init(path: str):
    """(model config, weights, tokenizer) of a checkpoint or Hugging Face folder for --init."""
    from ..api import load_model, load_tokenizer
    from ..checkpoint_io import model_state_for_saving

    model = load_model(path)
    return model.config, model_state_for_saving(model), load_tokenizer(path)


def sample_text(checkpoint, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """The prompt, '|', and the checkpoint model's sampled continuation (seeded; on the CPU)."""
    import torch

    from ..api import load_model
    from ..generation import SamplingParams, generate

    model = load_model(checkpoint)
    prompt = prompt or [tokenizer.bos_id]
    params = SamplingParams(temperature=0.8, top_k=40)
    with torch.no_grad():
        new = generate(model, [prompt], max_new_tokens, params, torch.Generator().manual_seed(0),
                       eos_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode(prompt) + "|" + tokenizer.decode(new)
