"""``custom-llm generate`` (streamed text from a checkpoint) and the held-out text side of ``custom-llm eval``
(loss, perplexity, bits per byte; its parser is in :mod:`.eval`): argument parsing over :mod:`custom_llm.generation`.

Prompts start with the start token the model saw at the beginning of every training document: EOS
(the training data's document separator) for custom-llm checkpoints, BOS for Hugging Face folders.
The context policy for long prompts is :func:`custom_llm.generation.streaming.fit_to_context`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Optional

from ..config import MAX_SEED, field_docs
from ..errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # the --dtype choices: api.DTYPE_NAMES and auto


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a checkpoint",
                         description="Stream text generated from a prompt (--prompt, --prompt-file, or one prompt "
                                     "per line on standard input). Prompts longer than the model's context are "
                                     "an error; generation is capped to the context when the model has "
                                     "full-attention layers.")
    add_model_args(gen)
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    add_sampling_args(gen, temperature=0.8)
    gen.add_argument("--seed", type=int, default=0, help="random seed: the same seed and flags give the same text")
    gen.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                     help="stop when the text contains one of these strings (not printed)")
    compiling = gen.add_mutually_exclusive_group()
    compiling.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                           help="do not compile the decode step (compiled with CUDA graphs by default on CUDA)")
    compiling.add_argument("--compile", dest="compile", action="store_true",
                           help="compile the decode step on the CPU too (inductor; the first tokens take a minute)")
    gen.add_argument("--draft", default=None, metavar="PATH",
                     help="speculative decoding with this smaller checkpoint (same tokenizer) as the draft model")
    gen.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                     help="tokens the draft proposes per target forward (default 4)")
    gen.set_defaults(func=run_generate)


def add_sampling_args(parser, temperature: float) -> None:
    """The sampling flags of ``generate`` and ``chat``, their help from SamplingParams' field docs."""
    from ..generation.sampling import SamplingParams

    docs = field_docs(SamplingParams)
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=docs["temperature"] + f" (default {temperature})")
    parser.add_argument("--top-k", type=int, default=0, help=docs["top_k"])
    parser.add_argument("--top-p", type=float, default=1.0, help=docs["top_p"])
    parser.add_argument("--min-p", type=float, default=0.0, help=docs["min_p"])
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help=docs["repetition_penalty"])


def add_model_args(parser) -> None:
    """The flags that say which model to load and how: those of :func:`custom_llm.api.load_for_inference`."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, run directory (newest checkpoint) "
                                                      "or Hugging Face model folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype (default auto: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="quantize the weights on load (weight-only; see custom-llm quantize)")
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128),
                        help="int4 group size for --quantize (default 32)")


def load_from_args(args):
    """(model, tokenizer, start token id or None) as :func:`add_model_args`' flags ask."""
    from ..api import load_for_inference

    return load_for_inference(args.ckpt, args.device, args.dtype, args.quantize, args.group_size)


def run_generate(args) -> int:
    import torch

    from ..generation import Engine, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}] (got {args.seed})")
    if any(stop == "" for stop in args.stop):
        raise UserError("--stop needs a non-empty string (an empty stop string would end every answer at once)")
    prompt_text = _read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    model, tokenizer, start = load_from_args(args)
    # prepare_model: eval() and, for eager CPU decoding, weights stored transposed (faster matrix-vector products)
    engine = (_speculative_engine(model, tokenizer, args) if args.draft
              else Engine(model, compile=args.compile, prepare_model=True))
    from_stdin, failed = prompt_text is None, 0
    for text in _prompts(prompt_text):
        try:
            generator = torch.Generator(device=engine.device).manual_seed(args.seed)
            _generate_one(engine, tokenizer, start, text, args, params, generator)
        except UserError as exc:
            if not from_stdin:
                raise
            sys.stderr.write(f"error: {exc}\n")  # the session goes on with the next prompt
            failed += 1
    # A script piping prompts must see that one failed; a person at the terminal saw each message.
    return 2 if failed and not sys.stdin.isatty() else 0


class _SpeculativeEngine:
    """The part of Engine's interface the command uses, over a SpeculativeDecoder (one prompt per call)."""

    def __init__(self, decoder):
        self.decoder, self.model = decoder, decoder.target
        self.device = decoder.target.embed_tokens.weight.device
        self.has_full_attention = any(w is None for w in self.model.layer_windows)

    def stream(self, prompts, max_new_tokens, params, generator):
        import logging

        yield from ([token] for token in self.decoder.stream(prompts[0], max_new_tokens, params, generator))
        stats = self.decoder.stats
        logging.getLogger(__name__).info("draft acceptance: %.1f%% (%d of %d proposed tokens, %d target forwards)",
                                         100 * stats.acceptance_rate, stats.accepted, stats.proposed, stats.rounds)


def _speculative_engine(model, tokenizer, args):
    """--draft: load the draft like the target (device, dtype, --quantize) and check it shares the tokenizer."""
    from ..api import load_model, load_tokenizer
    from ..generation.speculative import SpeculativeDecoder

    if not Path(args.draft).exists():
        raise UserError(f"draft checkpoint not found: {args.draft}")
    if load_tokenizer(args.draft).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"the draft {args.draft} has a different tokenizer from the target's")
    weight = model.embed_tokens.weight
    draft = load_model(args.draft, device=weight.device, dtype=weight.dtype)
    if args.quantize:
        from ..generation.quant import quantize_model

        quantize_model(draft, args.quantize, args.group_size)
    return _SpeculativeEngine(SpeculativeDecoder(model, draft, args.draft_tokens))


def _generate_one(engine, tokenizer, start: Optional[int], text: str, args, params, generator) -> None:
    """Stream the continuation of one prompt to stdout, as it is produced."""
    from ..generation.streaming import StopStrings, fit_to_context

    ids = ([start] if start is not None else []) + tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt is empty and the tokenizer has no start token")
    model = engine.model
    max_new, notice = fit_to_context(len(ids), args.max_new_tokens, model.config.max_seq_len, engine.has_full_attention)
    if notice:
        sys.stderr.write(notice + "\n")
    decoder, stops, out = tokenizer.incremental_decoder(), StopStrings(args.stop), sys.stdout
    for token in engine.stream([ids], max_new, params, generator):
        token_id = int(token[0])
        if token_id == tokenizer.eos_id:
            break
        out.write(stops.push(decoder.push(token_id)))
        out.flush()
        if stops.stopped:
            break
    if not stops.stopped:
        out.write(stops.push(decoder.flush()) + stops.flush())
    out.write("\n")
    out.flush()


def _read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from None


def _prompts(text: Optional[str]) -> Iterator[str]:
    """The one prompt given, or one prompt per line of standard input (interactive)."""
    if text is not None:
        yield text
        return
    tty = sys.stdin.isatty()
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def run_eval(args) -> int:
    from ..data import load_documents
    from ..generation.evaluate import evaluate_texts

    for name in ("max_tokens", "seq_len", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    model, tokenizer, start = load_from_args(args)
    context = model.config.max_seq_len
    seq_len = args.seq_len or context
    if seq_len > context:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens (max_seq_len)")
    docs = load_documents(args.data)
    result = evaluate_texts(model, tokenizer, [d.text for d in docs], start_id=start, seq_len=seq_len,
                            batch_size=args.batch_size, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(vars(result)))
    else:
        print(f"loss: {result.loss:.4f} nats/token\nperplexity: {result.perplexity:.3f}\n"
              f"bits per byte: {result.bits_per_byte:.4f}\ntokens: {result.tokens}\nbytes: {result.bytes}")
    return 0
