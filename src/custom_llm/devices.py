"""Which device a command runs on: the one resolver every command and the trainer use."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError


def available_devices() -> list[str]:
    """The devices this machine offers, as names ``--device`` accepts."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def resolve_device(name: Optional[str] = "auto", local_rank: int = 0, flag: str = "--device") -> torch.device:
    """``auto`` (or None): CUDA when available (device ``local_rank``), else the CPU; ``cpu``; ``cuda`` (device
    ``local_rank``) or ``cuda:N``. Anything else, or CUDA on a machine without it, is a UserError that names
    the devices this machine has."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name!r}: CUDA is not available on this machine; it has: "
                        f"{', '.join(available_devices())}")
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name!r} is not available here; this machine has: {', '.join(available_devices())}")
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name!r}: no CUDA device {index}; this machine has: "
                            f"{', '.join(available_devices())}")
        return torch.device("cuda", index)
    return device


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tile units (Intel Xeon from Sapphire Rapids on), which multiply bf16 matrices
    about 10x faster than fp32 (2 cores, a 2048x192 by 192x4096 product: 1,181 against 95-128 GFLOP/s)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def bf16_matmul_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA with bf16; CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return cpu_has_amx() or bool(probe is not None and probe())
