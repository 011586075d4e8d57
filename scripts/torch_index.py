#!/usr/bin/env python3
"""Which PyTorch CUDA build an NVIDIA driver can run: the driver -> CUDA table behind scripts/setup.sh.

A CUDA build of torch runs when the driver is at least the one its CUDA toolkit shipped with (NVIDIA's
CUDA Toolkit release notes, table "CUDA Toolkit and Corresponding Driver Versions", Linux x86_64). Each
row pairs such a minimum driver with PyTorch's wheel index for that CUDA (https://download.pytorch.org/whl/cuXXX)
and the torch versions published there that this project supports (>= 2.6):

    driver >= 580.65.06  CUDA 13.0  cu130  torch >= 2.9
    driver >= 570.26     CUDA 12.8  cu128  torch >= 2.7
    driver >= 560.28.03  CUDA 12.6  cu126  torch >= 2.6
    driver >= 550.54.14  CUDA 12.4  cu124  torch 2.6 only (the last release built for 12.4)
    driver >= 520.61.05  CUDA 11.8  cu118  torch 2.6 and 2.7 (the last built for 11.8); R535 lands here
    older                none: no torch >= 2.6 build runs; upgrade the driver

CUDA 12.x builds also start on drivers >= 525.60.13 through CUDA's minor-version compatibility, but
without PTX JIT (which Triton-generated kernels can need), so the table keeps to native support; force a
newer build with TORCH_SPEC / TORCH_INDEX_URL (see setup.sh). GPUs older than Turing (compute capability
below 7.5: V100, P100) are capped at cu126: PyTorch's CUDA 12.8+ builds no longer ship their kernels.

usage: torch_index.py [DRIVER_VERSION [COMPUTE_CAPABILITY]]   (default: both read from nvidia-smi)
prints one line "<tag> <pip requirement> <index url> <driver>", e.g.
"cu118 torch>=2.6,<2.8 https://download.pytorch.org/whl/cu118 535.183.01"; exit 1 with a message when
the driver is too old for every build, 2 when the driver version cannot be read. Standard library only.
"""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple, Optional

INDEX = "https://download.pytorch.org/whl/"


class Build(NamedTuple):
    """One row of the table: the oldest driver that runs it, the wheel tag, the torch requirement."""

    min_driver: str
    tag: str
    requirement: str


BUILDS = (
    Build("580.65.06", "cu130", "torch>=2.9"),
    Build("570.26", "cu128", "torch>=2.7"),
    Build("560.28.03", "cu126", "torch>=2.6"),
    Build("550.54.14", "cu124", "torch>=2.6,<2.7"),
    Build("520.61.05", "cu118", "torch>=2.6,<2.8"),
)
"""Newest first; the first row whose minimum the driver meets wins."""

PRE_TURING_MAX = "cu126"
"""The newest build that still has kernels for compute capability < 7.5."""


def parse_version(text: str) -> tuple[int, ...]:
    """'535.183.01' -> (535, 183, 1); a ValueError for anything that is not dot-separated integers."""
    parts = text.strip().split(".")
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a driver version: {text!r}")
    return tuple(int(p) for p in parts)


def choose_build(driver: str, compute_capability: Optional[str] = None) -> Optional[Build]:
    """The newest build the driver runs natively (capped at cu126 before Turing); None if there is none."""
    version = parse_version(driver)
    candidates = BUILDS
    if compute_capability and parse_version(compute_capability) < (7, 5):
        candidates = BUILDS[[b.tag for b in BUILDS].index(PRE_TURING_MAX):]
    for build in candidates:
        if version >= parse_version(build.min_driver):
            return build
    return None


def query_nvidia_smi() -> tuple[str, Optional[str]]:
    """(driver version, lowest compute capability) of the GPUs nvidia-smi lists."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]
    if not rows:
        raise ValueError("nvidia-smi listed no GPU")
    caps = [row[1] for row in rows if len(row) > 1 and row[1] and row[1][0].isdigit()]
    return rows[0][0], min(caps, key=parse_version) if caps else None


def main(argv: list[str]) -> int:
    """Print the build for the given (or nvidia-smi's) driver; the exit code."""
    try:
        driver, capability = (argv[0], argv[1] if len(argv) > 1 else None) if argv else query_nvidia_smi()
        build = choose_build(driver, capability)
    except (OSError, ValueError, subprocess.CalledProcessError) as error:
        print(f"torch_index: cannot read the NVIDIA driver version: {error}", file=sys.stderr)
        return 2
    if build is None:
        print(f"torch_index: NVIDIA driver {driver} is older than {BUILDS[-1].min_driver}, the oldest that runs a torch >= 2.6 "
              "CUDA build; upgrade the driver (R550 or newer recommended)", file=sys.stderr)
        return 1
    print(build.tag, build.requirement, INDEX + build.tag, driver)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
