"""The benchmark runner's pieces: one result record, side-by-side timing, memory peaks, output.

Every case measures "ours" against a reference in the same process, on the same inputs, *alternating*
the two after warm-up (ours, ref, ours, ref, ...), so that a slow phase of a shared machine hits both,
and reports medians. ``ratio`` is always ``ours / ref``; whether higher is better depends on the unit
(throughputs: higher; memory and seconds: lower) and is recorded in ``config["higher_is_better"]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..training.distributed import H100_SXM_BF16_PEAK_FLOPS  # the one peak table (training/distributed.py)


@dataclass
class Result:
    """One benchmark line: ``{"case", "ours", "ref", "ratio", "unit", "device", "config"}``."""

    case: str
    ours: float
    ref: Optional[float]
    unit: str
    device: str
    config: dict = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        return ratio(self.ours, self.ref)

    def to_dict(self) -> dict:
        return {"case": self.case, "ours": self.ours, "ref": self.ref, "ratio": self.ratio,
                "unit": self.unit, "device": self.device, "config": self.config}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


def ratio(ours: float, ref: Optional[float]) -> Optional[float]:
    """ours / ref, or None without a (positive) reference."""
    if ref is None or ref <= 0:
        return None
    return ours / ref


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn: warm-up rounds first, then ``repeats`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]]) -> Optional[float]:
    """Median over rounds of ref_time / ours_time within each round: a throughput ratio that a change
    of machine load between rounds disturbs less than the ratio of medians (reported beside it)."""
    if "ref" not in times or not times["ref"]:
        return None
    return median([r / o for o, r in zip(times["ours"], times["ref"])])


@contextlib.contextmanager
def _c_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block (what C++ code prints there is dropped)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before it.

    CUDA: ``max_memory_allocated`` after a reset, minus the allocation at the start. CPU: the torch
    profiler's allocation trace (``profile_memory``), whose running "Total Allocated" counts every
    tensor allocated and freed inside the window; its maximum is the same quantity. Process RSS would
    also count allocator caching and fragmentation, which is why it is not used.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _c_stderr_silenced():  # the profiler's C++ side prints "USDT ... profiler_start/stop" lines
        prof.__enter__()
    try:
        fn()
    finally:
        with _c_stderr_silenced():
            prof.__exit__(None, None, None)
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        with open(handle.name, encoding="utf-8") as trace_file:
            events = json.load(trace_file).get("traceEvents", [])
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max([0, *totals])


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = H100_SXM_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (see ``device_peak_flops``)."""
    return tokens_per_s * flops_per_token / peak_flops


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width text table of results (the default output)."""
    header = ("case", "ours", "ref", "ratio", "unit", "device")
    rows = [header]
    for r in results:
        rows.append((r.case, _num(r.ours), _num(r.ref), "-" if r.ratio is None else f"{r.ratio:.2f}x",
                     r.unit, r.device))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if 0 < i < 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.case}: {r.config['note']}" for r in results if r.config.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
