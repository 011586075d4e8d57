"""``custom-llm eval``: loss, perplexity and bits per byte on held-out text (``--data``), or benchmark tasks
of lm-evaluation-harness (``--tasks``), built-in or local (``--include`` folders of YAML + JSONL).

The text evaluation is :func:`custom_llm.cli.generate.run_eval`; the harness side is
:mod:`custom_llm.evaluation` (our model as the harness's ``custom-llm`` model type).
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from .generate import add_model_args, run_eval


def register(sub) -> None:
    """Add the ``eval`` sub-command."""
    ev = sub.add_parser("eval", help="evaluate on held-out text (loss, perplexity, bits per byte) or on benchmark tasks",
                        description="Evaluate a checkpoint. With --data: loss (nats/token), perplexity and bits per "
                                    "byte (total nats / ln 2 / UTF-8 bytes: tokenizer-independent) on held-out "
                                    "text. With --tasks: tasks of lm-evaluation-harness (hellaswag, arc_easy, ...; "
                                    "built-in tasks download their data once), or local tasks (YAML + JSONL) from "
                                    "--include folders or YAML paths, which run offline; prints the harness's table.")
    add_model_args(ev)
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", metavar="PATH",
                      help="held-out text: files, directories, globs or .jsonl files (as for training)")
    what.add_argument("--tasks", metavar="T1,T2,...",
                      help="comma-separated harness tasks, groups or task YAML files (e.g. hellaswag,arc_easy)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows / requests per forward pass (default 8)")
    text = ev.add_argument_group("text evaluation (--data)")
    text.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    text.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    text.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    tasks = ev.add_argument_group("benchmark tasks (--tasks)")
    tasks.add_argument("--include", nargs="+", action="extend", default=[], metavar="PATH",
                       help="folders (or YAML files) of local task definitions to add to the built-in ones")
    tasks.add_argument("--limit", type=float, default=None,
                       help="evaluate the first N examples of each task (a value below 1: that fraction)")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    tasks.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                       help="generation arguments for generate_until tasks (e.g. max_gen_toks=64,temperature=0)")
    tasks.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    tasks.add_argument("--seed", type=int, default=0, help="seed for few-shot sampling and sampled generation")
    tasks.add_argument("--output", default=None, metavar="FILE",
                       help="also write the results as JSON (put it beside a run, e.g. RUN/eval/tasks.json, and "
                            "custom-llm report shows it)")
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data:
        return run_eval(args)
    return run_tasks(args)


def run_tasks(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task")
    for name in ("batch_size", "num_fewshot", "max_length"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'num_fewshot' else 1} (got {value})")
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--limit must be > 0 (got {limit:g})")
        limit = int(limit) if limit >= 1 else limit
    try:
        from ..evaluation.harness import CustomLLM
        from ..evaluation.tasks import results_table, run_tasks as evaluate, save_results
    except ImportError as exc:
        raise UserError(f"--tasks needs lm-evaluation-harness ({exc}); install it with: pip install 'custom-llm[eval]'") from None

    lm = CustomLLM(ckpt=args.ckpt, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                   max_length=args.max_length, seed=args.seed, quantize=args.quantize, group_size=args.group_size)
    try:
        results = evaluate(lm, tasks, include=args.include, limit=limit, num_fewshot=args.num_fewshot,
                           gen_kwargs=args.gen_kwargs, seed=args.seed)
    except ConnectionError as exc:  # a built-in task's data set is not cached and the Hub cannot be reached
        raise UserError(f"{exc} (built-in tasks download their data from the Hugging Face Hub once; offline, "
                        f"use local tasks: YAML + JSONL with --include, see the README)") from None
    print(results_table(results))
    if args.output:
        path = save_results(results, args.output, extra={"ckpt": str(args.ckpt), "tasks": tasks, "limit": limit,
                                                          "num_fewshot": args.num_fewshot,
                                                          "batch_size": args.batch_size})
        print(f"results written to {path}")
    return 0
