"""The run's environment: device, precision, and (under torchrun) the process group.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the trainer joins a process
group (NCCL on GPUs, gloo on CPUs) and wraps the model in DistributedDataParallel. Rank 0 logs and
saves; every rank trains on its own slice of each global batch.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..devices import cpu_has_amx, resolve_device
from ..errors import UserError

log = logging.getLogger("custom_llm.training")

H100_SXM_BF16_PEAK_FLOPS = 989e12
"""NVIDIA H100 SXM, dense bf16 tensor cores (1979 TFLOP/s is with 2:4 sparsity); also the bench's reference."""

# Published dense (no sparsity) bf16 tensor-core peaks per GPU, FP32 accumulation, used for MFU: NVIDIA's
# data sheets (data-centre cards) and Ada / Ampere architecture white papers (GeForce, whose FP32-accumulate
# rate is half the FP16-accumulate one). Each row: (label, full-match pattern for the name
# torch.cuda.get_device_name reports without its "NVIDIA " prefix, FLOP/s). Full matches keep form
# factors apart: "H100 PCIe" can never take the SXM number, nor "RTX 3090 Ti" the 3090's; a bare "H100"
# (form factor unknown) and unlisted cards get no peak rather than a guess.
PEAK_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 SXM", r"H100 (SXM5? )?\d+GB HBM3e?|H100 SXM5?( \d+GB)?", H100_SXM_BF16_PEAK_FLOPS),
    ("H100 PCIe", r"H100 (\d+GB )?PCIe", 756e12),
    ("H100 NVL", r"H100 NVL", 835e12),
    ("H200 SXM", r"H200( SXM)?( \d+GB HBM3e)?", 989e12),
    ("H200 NVL", r"H200 NVL", 835e12),
    ("GH200", r"GH200( \d+GB)?", 989e12),
    ("B200", r"B200", 2250e12),
    ("A100", r"A100([- ].*)?", 312e12),  # SXM4 and PCIe, 40 and 80 GB: one peak
    ("L40S", r"L40S", 362e12),
    ("L40", r"L40", 181e12),
    ("L4", r"L4", 121e12),
    ("A10", r"A10", 125e12),
    ("RTX A6000", r"RTX A6000", 154.8e12),
    ("GeForce RTX 4090", r"GeForce RTX 4090", 165.2e12),
    ("GeForce RTX 3090", r"GeForce RTX 3090", 71e12),
)


def device_peak_flops(device_name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak FLOP/s, "label (name): N TFLOP/s ...") for a CUDA device name; (None, reason) if unlisted."""
    name = re.sub(r"^NVIDIA ", "", device_name.strip())
    for label, pattern, value in PEAK_FLOPS:
        if re.fullmatch(pattern, name):
            return value, f"{label} ({device_name}): {value / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"no published peak listed for {device_name!r} (training/distributed.py PEAK_FLOPS)"


@dataclass
class Runtime:
    """Where this process runs: rank and world size, device, and the precision policy."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str
    """Resolved precision: 'fp32', 'bf16' or 'fp16'."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32); weights stay fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_precision(preference: str, device: torch.device) -> str:
    """'auto': bf16 on CUDA with bf16 support, else fp16 on CUDA; on the CPU bf16 where it has AMX, else fp32.

    On an AMX CPU (2 cores), bf16 autocast, with attention kept in fp32, trains the ``tiny`` job 1.54x
    and ``shakespeare-char-cpu`` 1.20x faster than fp32 in tokens/s (``custom-llm bench --cases
    small_steps,small_steps_tiny``; the default job end to end 1.51x) to the same validation loss
    (tiny 3.829 against 3.838, shakespeare-char-cpu 1.678 against 1.674). Without AMX, bf16 matmuls
    are no faster than fp32 ones and the casts cost time. Master weights, gradients and optimizer
    state stay fp32 either way.
    """
    if preference == "auto":
        if device.type != "cuda":
            return "bf16" if cpu_has_amx() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if preference == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    return preference


def init_runtime(device_preference: str, precision_preference: str) -> Runtime:
    """Read the torchrun environment, join the process group when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, device, resolve_precision(precision_preference, device))


def shutdown(runtime: Runtime) -> None:
    """Leave the process group (if this process joined one)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op on one rank)."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (no-op on one rank)."""
    if runtime.distributed:
        dist.barrier()


def peak_flops(runtime: Runtime) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device, its description), or (None, reason) when unknown."""
    if runtime.device.type != "cuda":
        return None, "no published peak for CPUs"
    value, description = device_peak_flops(torch.cuda.get_device_name(runtime.device))
    if value is not None and runtime.precision == "fp32":
        description += " (fp32 run: MFU understated)"
    return value, description


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (their type moved between torch versions)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "CUDA out of memory" in str(exc)


OOM_HINT = ("CUDA out of memory: lower the micro-batch (raise --train.grad_accum_steps or lower --train.batch_size), "
            "shorten sequences (--train.seq_len or the curriculum's seq_len), or enable activation checkpointing "
            "(--model.grad_checkpointing true)")
