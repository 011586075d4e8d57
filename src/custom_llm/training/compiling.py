"""Whether to torch.compile: the one policy for training and the bench, asked before any work.

Inductor writes Triton kernels on CUDA and C++ on the CPU, and finds out that it cannot only at the
first forward, deep in a training step; :func:`compile_toolchain_problem` asks up front.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..errors import UserError

log = logging.getLogger("custom_llm.training")


def compile_toolchain_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot generate code for ``device`` on this machine, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # an older torch: nothing to ask, the first step will tell
        return None
    try:
        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - InvalidCxxCompiler and whatever probing the compiler raises
        return str(error).strip().split("\n", 1)[0] or type(error).__name__
    return None


def resolve_compile(requested: Optional[bool], device: torch.device, default: bool, flag: str, off_hint: str,
                    activity: str) -> bool:
    """Whether to compile: ``requested`` when set, else ``default``. Where the toolchain is missing,
    an explicit True is a UserError naming ``flag`` and a default True is dropped with a warning."""
    wanted = default if requested is None else requested
    problem = compile_toolchain_problem(device) if wanted else None
    if problem is None:
        return wanted
    if requested:
        raise UserError(f"{flag}: torch.compile cannot generate {device.type} code here ({problem}); {off_hint}")
    log.warning("%s without torch.compile: %s", activity, problem)
    return False


def use_compile(requested: Optional[bool], device: torch.device) -> bool:
    """``train.compile`` resolved for this device (default: on CUDA), see :func:`resolve_compile`."""
    return resolve_compile(requested, device, device.type == "cuda", "train.compile",
                           "fix that or pass --train.compile false", "training")
