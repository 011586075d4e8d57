"""The case registry and the runner behind ``custom-llm bench``."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from ..devices import resolve_device
from ..errors import UserError
from .context import Context
from .core import Result
from .sizes import sizes_for


def _case(module: str, name: str) -> Callable[[Context], Result]:
    """A case function imported on first use (so one case's heavy imports do not slow the others)."""

    def run(ctx: Context) -> Result:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(ctx)

    run.__name__ = name
    return run


CASES: dict[str, Callable[[Context], Result]] = {
    "train_dense": _case("train_cases", "train_dense"),
    "train_moe": _case("train_cases", "train_moe"),
    "decode": _case("inference_cases", "decode"),
    "prefill": _case("inference_cases", "prefill"),
    "decode_int8": _case("quant_cases", "decode_int8"),
    "decode_int4": _case("quant_cases", "decode_int4"),
    "speculative": _case("quant_cases", "speculative"),
    "quant_quality": _case("quant_cases", "quant_quality"),
    "tokenize": _case("tokenize_case", "tokenize"),
    "grad_ckpt_memory": _case("train_cases", "grad_ckpt_memory"),
    "curriculum": _case("curriculum_case", "curriculum"),
    "shakespeare_char": _case("shakespeare_case", "shakespeare_char"),
    "serve": _case("serve_case", "serve"),
    "optimizers": _case("optimizer_case", "optimizers"),
    "optimizers_tiny": _case("optimizer_case", "optimizers_tiny"),
    "eval_loglikelihood": _case("eval_case", "eval_loglikelihood"),
    "lora_memory": _case("lora_case", "lora_memory"),
    "small_steps": _case("small_steps_case", "small_steps"),
    "small_steps_tiny": _case("small_steps_case", "small_steps_tiny"),
}
"""Every case, in the order they run."""

DEFAULT_CASES = tuple(name for name in CASES if name not in ("curriculum", "shakespeare_char", "eval_loglikelihood",
                                                             "optimizers", "optimizers_tiny", "serve", "quant_quality",
                                                             "small_steps", "small_steps_tiny"))
"""Cases run without ``--cases``; the two that train models to a loss, and the lm-eval one (it needs the
lm-eval package), run only when named."""


def resolve_cases(names: Optional[Sequence[str]]) -> list[str]:
    """The cases to run, in registry order; a UserError naming any unknown case."""
    if not names:
        return list(DEFAULT_CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise UserError(f"unknown bench case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return [n for n in CASES if n in names]


def run_benchmarks(cases: Optional[Sequence[str]] = None, device: str = "cpu", *, repeats: Optional[int] = None,
                   quick: bool = False, compile: Optional[bool] = None, ref_compile: bool = False,
                   seed: int = 0, data: Optional[str] = None) -> Iterator[Result]:
    """Run the cases one after the other, yielding each result as soon as it is measured.

    ``compile`` (default: on CUDA only, and never with ``quick``) compiles our training blocks and
    decode step; ``ref_compile`` also compiles the Hugging Face reference in training cases.
    """
    names = resolve_cases(cases)
    dev = resolve_device(device)  # --device: cpu or cuda (choices of the CLI)
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats must be at least 1 (got {repeats})")
    from ..training.compiling import resolve_compile  # imported on use, like the cases' heavy modules

    compile = resolve_compile(compile, dev, dev.type == "cuda" and not quick, "--compile", "run without --compile",
                              "benchmarking our side")
    ctx = Context(device=dev, sizes=sizes_for(dev, quick, repeats), compile=compile, ref_compile=ref_compile,
                  seed=seed, quick=quick, data=data)
    for name in names:
        result = CASES[name](ctx)
        result.config.update(torch=torch.__version__, threads=torch.get_num_threads())
        yield result
