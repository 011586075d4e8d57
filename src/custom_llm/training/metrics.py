"""Run metrics: ``metrics.jsonl`` (one JSON object per row) and, when installed, TensorBoard.

Rows carry ``step`` and ``tokens`` and any of: ``loss`` (mean training LM loss since the previous
row, nats/token), ``lr``, ``tokens_per_s``, ``mfu``, ``stage``, ``val_loss``, ``val_ppl``,
``moe_load`` (per MoE layer, the fraction of routed tokens each expert received), ``bad_steps``,
``stage_change`` ({"from", "to", "reason"}).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("custom_llm.training")

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """All rows of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends rows to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:  # drop rows logged after the checkpoint we resume from: they will be logged again
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = self._open_tensorboard(run_dir, resume_step) if tensorboard else None

    @staticmethod
    def _open_tensorboard(run_dir: Path, resume_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (flushed at once, so a crash loses nothing already logged)."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class RunLog:
    """The run's outputs on rank 0: ``metrics.jsonl`` rows and the progress display.

    It reads the run's state and never changes it. On a terminal progress is a tqdm bar; piped to a
    file or CI log it is a plain line at most every ``plain_every`` steps (and at every evaluation),
    instead of thousands of carriage-return redraws.
    """

    def __init__(self, run_dir: Path, *, is_main: bool, start_step: int, start_tokens: int, max_steps: int,
                 resumed: bool, progress: bool, peak: Optional[float], world_size: int, flops_per_token: Any):
        import sys
        import time

        self.peak, self.world_size, self.flops_per_token = peak, world_size, flops_per_token
        self.writer = MetricsWriter(run_dir, resume_step=start_step if resumed else None) if is_main else None
        self.interval = (time.time(), start_tokens)
        self.bar = None
        self.plain_every = max(1, max_steps // 20)
        self.last_plain = start_step
        self.plain = progress and is_main and not sys.stderr.isatty()
        if progress and is_main and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def row(self, state: Any, lr: float, seq_len: int, expert_load: dict, extra: dict) -> dict:
        """Write the metrics row of ``state.step`` (the mean of ``state.pending_losses`` as its loss)."""
        import time

        now = time.time()
        seconds, tokens0 = now - self.interval[0], self.interval[1]
        self.interval = (now, state.tokens)
        row: dict = {"step": state.step, "tokens": state.tokens, "lr": lr, "stage": state.curriculum.stage}
        if state.pending_losses:
            row["loss"] = sum(state.pending_losses) / len(state.pending_losses)
        if seconds > 0 and state.tokens > tokens0:
            row["tokens_per_s"] = (state.tokens - tokens0) / seconds
            if self.peak:
                row["mfu"] = row["tokens_per_s"] * self.flops_per_token(seq_len) / (self.peak * self.world_size)
        if state.bad_steps:
            row["bad_steps"] = state.bad_steps
        if expert_load:
            row["moe_load"] = [[round(float(v), 4) for v in load.tolist()] for _, load in sorted(expert_load.items())]
        row.update(extra)
        if self.writer is not None:
            self.writer.write(row)
        if self.bar is not None:
            self.bar.set_postfix(_postfix(row), refresh=False)
        elif self.plain and ("val_loss" in row or state.step - self.last_plain >= self.plain_every):
            self.last_plain = state.step
            log.info("step %d: %s", state.step, ", ".join(f"{k} {v}" for k, v in _postfix(row).items()))
        return row

    def advance(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _postfix(row: dict) -> dict:
    """The fields of a row shown beside the progress bar (or in a plain progress line)."""
    shown = {}
    if "loss" in row:
        shown["loss"] = f"{row['loss']:.3f}"
    if "val_loss" in row:
        shown["val"] = f"{row['val_loss']:.3f}"
    if row.get("lr") is not None:
        shown["lr"] = f"{row['lr']:.2e}"
    if "tokens_per_s" in row:
        shown["tok/s"] = f"{row['tokens_per_s']:.0f}"
    if "mfu" in row:
        shown["mfu"] = f"{100 * row['mfu']:.1f}%"
    return shown
