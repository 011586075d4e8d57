"""``loss.png``: training and validation loss against tokens seen, curriculum stage changes marked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .metrics import read_metrics


def plot_losses(metrics_path: Path, out_path: Path, reference: Optional[float] = None,
                reference_label: str = "unigram entropy") -> Path:
    """Draw the loss curves of a metrics.jsonl file into ``out_path`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    changes = [r for r in rows if "stage_change" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", label=f"{reference_label} ({reference:.2f})")
    for i, row in enumerate(changes):
        change = row["stage_change"]
        ax.axvline(row["tokens"], color="tab:red", linestyle="--", alpha=0.6,
                   label="curriculum stage change" if i == 0 else None)
        ax.annotate(f"stage {change['to']}", (row["tokens"], 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
