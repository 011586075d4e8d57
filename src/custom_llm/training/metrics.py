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
