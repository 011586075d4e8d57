"""``custom-llm report RUN``: a Markdown + PNG report card of a training run (:mod:`custom_llm.evaluation.report`).

This module gathers the run's facts (checkpoint, configs, trainer state, metrics, validation text,
stored benchmark results, a sample); the evaluation package measures and renders them.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from ..errors import UserError

SAMPLE_TOKENS = 64


def register(sub) -> None:
    """Add the ``report`` sub-command."""
    rep = sub.add_parser("report", help="write a Markdown + PNG report card of a training run",
                         description="Summarise a run directory (or one checkpoint of it) in RUN/report.md and "
                                     "RUN/report.png: configuration, parameters, tokens, training time, loss curve, "
                                     "validation loss / perplexity / bits per byte, benchmark results stored beside "
                                     "the run (custom-llm eval --tasks ... --output RUN/eval/NAME.json), a sample.")
    rep.add_argument("run", metavar="RUN", help="run directory (its newest checkpoint) or a checkpoint directory")
    rep.add_argument("--out", default=None, help="folder for report.md and report.png (default: the run directory)")
    rep.add_argument("--data", nargs="+", default=None, metavar="PATH",
                     help="held-out text for the final loss / perplexity / bits per byte (default: the run's own "
                          "validation split, when its training data is still there)")
    rep.add_argument("--max-tokens", type=int, default=32768,
                     help="validation tokens to evaluate at most (default 32768)")
    rep.add_argument("--no-sample", dest="sample", action="store_false", help="do not generate a sample")
    rep.add_argument("--device", default="cpu", help="device for the validation pass and the sample (default cpu)")
    rep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import load_model, load_tokenizer
    from ..checkpoint_io import CONFIG_FILE, read_json, resolve_checkpoint_dir
    from ..evaluation.report import RunFacts, load_benchmarks, write_report
    from ..training.metrics import METRICS_FILE, read_metrics

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    path = Path(args.run)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    ckpt = resolve_checkpoint_dir(path)
    run_dir = path if ckpt != path else (path.parent if (path.parent / METRICS_FILE).is_file() else path)
    config = read_json(ckpt / CONFIG_FILE)
    state_file = ckpt / "trainer_state.json"
    device = torch.device(args.device)
    model = load_model(ckpt, device=device)
    tokenizer = load_tokenizer(ckpt)
    facts = RunFacts(name=run_dir.resolve().name, checkpoint=str(ckpt), model_config=config.get("model", {}),
                     train_config=config.get("train", {}), params=model.num_params(),
                     state=read_json(state_file) if state_file.is_file() else {},
                     metrics=read_metrics(run_dir / METRICS_FILE), benchmarks=load_benchmarks(run_dir))
    texts, facts.validation_note = _validation_texts(args.data, facts.train_config)
    if texts:
        from ..generation.evaluate import evaluate_texts

        facts.validation = evaluate_texts(model, tokenizer, texts, start_id=_start(tokenizer),
                                          seq_len=model.config.max_seq_len, max_tokens=args.max_tokens)
    if args.sample:
        facts.sample = _sample(model, tokenizer, texts)
    md, png = write_report(facts, Path(args.out) if args.out else run_dir)
    print(f"report written to {md} and {png}")
    return 0


def _validation_texts(data, train_config: dict) -> tuple[list[str], str]:
    """(held-out texts, a note saying where they come from or why there are none)."""
    from ..data import load_documents, split_documents

    if data:
        return [d.text for d in load_documents(data)], f"Measured here on {', '.join(data)} (--data)."
    sources = train_config.get("data")
    missing = [s for s in sources or [] if not s.startswith("hf:") and not glob.glob(s)]
    if missing:
        return [], (f"Not measured here: the run's training data ({', '.join(missing)}) is not on this machine; "
                    f"pass --data held-out text.")
    docs = load_documents(sources, text_field=train_config.get("text_field", "text"))
    _, val = split_documents(docs, train_config.get("val_fraction", 0.05))
    where = ", ".join(sources) if sources else "the default corpus"
    return [d.text for d in val], f"Measured here on the run's validation split of {where}."


def _start(tokenizer):
    """The start token our checkpoints are trained with (end-of-sequence, the document separator)."""
    return tokenizer.eos_id if tokenizer.eos_id >= 0 else None


def _sample(model, tokenizer, texts: list[str]) -> tuple[str, str]:
    """(prompt, continuation): the start of the validation text (or nothing), continued with seed 0."""
    import torch

    from ..generation import SamplingParams, generate

    prompt_ids = tokenizer.encode(texts[0])[:16] if texts else []
    start = _start(tokenizer)
    ids = ([start] if start is not None else []) + prompt_ids
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(0)
    new = generate(model, [ids], min(SAMPLE_TOKENS, model.config.max_seq_len - len(ids)),
                   SamplingParams(temperature=0.8, top_k=40), generator, eos_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode(prompt_ids), tokenizer.decode(new)
