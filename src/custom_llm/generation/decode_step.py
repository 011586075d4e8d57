"""The compiled decode step: how it is compiled, its lifecycle, and the settings it runs under.

:func:`compile_static` compiles a step function for static shapes (CUDA graphs on CUDA, inductor
C++ with frozen weights on the CPU). :class:`CompiledDecodeStep` wraps the compiled function with
the two behaviours an engine needs around it: falling back to eager code when compiling fails, and
skipping dynamo's guards on calls that repeat an earlier call's inputs. :func:`decode_precision`
scopes TF32 matmuls to fp32 decoding on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# Inductor settings for the CPU decode step. ``freezing`` treats the weights as constants, which
# lets inductor prepack them for its own C++ GEMM template (``max_autotune`` with the ``CPP``
# backend only, so nothing is benchmarked at compile time): batch-1 matrix-vector products that
# use every core and stream the weights about twice as fast as BLAS does here (2-core CPU, d=384,
# 12.6M parameters: 5.1 ms per token against 10 ms eager). Frozen weights must not change afterwards.
CPU_DECODE_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


def compile_static(fn: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """``fn`` compiled for static shapes: CUDA graphs on CUDA (``reduce-overhead``), frozen C++ on the CPU."""
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, dynamic=False)

    def step(*args: Any) -> torch.Tensor:
        # A config context, not torch.compile(options=...): measured, the options left the step at eager speed.
        with inductor_config.patch(CPU_DECODE_INDUCTOR):
            return compiled(*args)

    return step


class CompiledDecodeStep:
    """A compiled step function with an explicit lifecycle; ``state`` only ever moves forward:

    * ``"new"``: not compiled yet. torch.compile traces and compiles lazily, on the first call.
    * ``"compiled"``: a call succeeded, so the compiler works for this model. Later calls replay the
      compiled code (a new cache shape adds a variant); an error from now on is a real error and
      propagates.
    * ``"eager"``: the first call failed to compile (no C++ compiler, no Triton, an op the compiler
      rejects). One warning quotes the error's first line; this and every later call run ``eager``.

    Guard skipping. Before every call dynamo checks guards on the model and inputs (~0.4 ms a call
    on a 2-core CPU for the 6-layer d=384 model, 8% of its step). A caller that knows a call repeats
    an earlier call's inputs (the same cache tensors and shapes; only the values of the token and
    time tensors differ) passes ``inputs_seen=True``, and once compiled the call skips them
    (``set_stance(skip_guard_eval_unsafe=True)``: only the guards that tell the compiled variants
    apart run). Should a step need a new graph all the same (a model whose code specialises on data,
    say), torch refuses to compile with guards skipped and raises; the step is then retried with
    guards on, and if that succeeds, guards stay on for good (``skip_guards`` False). The retry
    decides, not the error's text: torch 2.13 raises a plain ``RuntimeError`` from C++ for this,
    with no type or counter to tell it apart, and a real error fails the retry too and propagates.
    Retrying is safe because a step's only side effect, writing this token's keys and values into
    the cache, writes the same values to the same slots again.
    """

    def __init__(self, compiled: Callable[..., torch.Tensor], eager: Callable[..., torch.Tensor]):
        self.compiled = compiled
        self.eager = eager
        self.state = "new"
        self.skip_guards = True

    def __call__(self, *args: Any, inputs_seen: bool = False) -> torch.Tensor:
        """The step's output for ``args`` (compiled unless compiling failed)."""
        if self.state == "eager":
            return self.eager(*args)
        if inputs_seen and self.skip_guards and self.state == "compiled":
            try:
                return self._run(args, skip_guards=True)
            except Exception:  # noqa: BLE001 - whatever it was, the retry with guards tells
                logits = self._run(args, skip_guards=False)
                log.info("decode step: a new graph was needed with guards skipped; checking guards from now on")
                self.skip_guards = False
                return logits
        try:
            logits = self._run(args, skip_guards=False)
        except Exception as error:  # noqa: BLE001 - any compiler failure; eager is always correct
            if self.state == "compiled":
                raise
            first_line = str(error).strip().split("\n", 1)[0]  # dynamo appends advice on debug flags
            log.warning("compiling the decode step failed (%s%s); decoding eagerly", type(error).__name__,
                        f": {first_line}" if first_line else "")
            self.state = "eager"
            return self.eager(*args)
        self.state = "compiled"
        return logits

    def _run(self, args: tuple, skip_guards: bool) -> torch.Tensor:
        with _skipping_guards() if skip_guards else contextlib.nullcontext():
            return self.compiled(*args).clone()  # clone: a CUDA graph replay reuses its output buffer


def _skipping_guards() -> contextlib.AbstractContextManager:
    """Compiled code skips the guards that cannot tell its variants apart (a no-op on a torch without the flag)."""
    try:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


@contextlib.contextmanager
def decode_precision(device: torch.device, dtype: torch.dtype):
    """fp32 on CUDA: TF32 matmuls (``set_float32_matmul_precision("high")``) inside, the caller's setting after.

    TF32 keeps fp32's range with a 10-bit mantissa in the tensor cores' products (fp32 accumulation),
    several times the fp32 matmul rate on A100/H100; logits move by ~1e-3 relative, so greedy tokens
    can differ from strict fp32 only where two logits nearly tie. A no-op elsewhere (CPU, bf16/fp16
    weights); nothing changes at import time or outside the engine's own steps.
    """
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
