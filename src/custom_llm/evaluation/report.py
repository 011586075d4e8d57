"""A training run's report card: one Markdown page and one PNG.

What it shows: the model and training configuration, parameter counts, steps and tokens, training time
(the logged tokens divided by the logged throughput, so evaluation and checkpoint pauses are not in
it), the loss curves, the final validation loss / perplexity / bits per byte (measured here on the
run's validation text when it is available, beside the last loss the run logged), every
lm-evaluation-harness result stored beside the run (JSON files written by ``custom-llm eval --tasks
... --output RUN/eval/NAME.json``), and a sample from the model.

The caller gathers the inputs (:class:`RunFacts`); this module only measures, renders and writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..fsutil import atomic_write

MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "sliding_window",
                "window_pattern", "n_experts", "moe_top_k", "tie_embeddings", "rope_theta")
TRAIN_FIELDS = ("data", "optimizer", "lr", "schedule", "warmup_steps", "batch_size", "seq_len", "max_steps",
                "weight_decay", "precision", "curriculum")


@dataclass
class RunFacts:
    """Everything the report shows, gathered from the run directory."""

    name: str
    checkpoint: str
    model_config: dict
    train_config: dict
    params: dict
    state: dict
    """trainer_state.json (step, tokens, evals, ...)."""
    metrics: list[dict]
    """Rows of metrics.jsonl."""
    validation: Optional[Any] = None
    """An :class:`~custom_llm.generation.evaluate.EvalResult` on the validation text, or None."""
    validation_note: str = ""
    """Where the validation numbers come from (or why there are none)."""
    benchmarks: list[tuple[str, dict]] = field(default_factory=list)
    """(file name, lm-eval results dictionary) per stored results file."""
    sample: Optional[tuple[str, str]] = None
    """(prompt, continuation)."""


def load_benchmarks(run_dir: Path) -> list[tuple[str, dict]]:
    """lm-eval results files beside a run: JSON objects with a ``results`` mapping, in RUN/ and RUN/eval/."""
    found = []
    for path in sorted([*Path(run_dir).glob("*.json"), *Path(run_dir).glob("eval/*.json")]):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and data["results"]:
            found.append((str(path.relative_to(run_dir)), data))
    return found


def training_time_s(metrics: Sequence[dict]) -> Optional[float]:
    """Seconds of training: for each logged interval, its new tokens over its logged tokens/s."""
    total, previous = 0.0, 0
    for row in metrics:
        if "tokens" in row and row.get("tokens_per_s"):
            total += (row["tokens"] - previous) / row["tokens_per_s"]
            previous = row["tokens"]
    return total or None


def benchmark_rows(benchmarks: Sequence[tuple[str, dict]]) -> list[tuple[str, str, str, float, Optional[float], str]]:
    """(task, metric, filter, value, stderr, file) for every numeric result."""
    rows = []
    for name, data in benchmarks:
        for task, metrics in data["results"].items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, filt = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                rows.append((task, metric, filt, float(value), stderr if isinstance(stderr, (int, float)) else None, name))
    return rows


def render_markdown(facts: RunFacts, png_name: str) -> str:
    """The report page."""
    state, time_s = facts.state, training_time_s(facts.metrics)
    lines = [f"# Report card: {facts.name}", "", f"Checkpoint `{facts.checkpoint}`.", "", f"![loss curve]({png_name})", "",
             "## Training", "", "| | |", "|---|---|",
             f"| steps | {state.get('step', '-')} |", f"| tokens | {state.get('tokens', 0):,} |",
             f"| training time | {_duration(time_s)} (from the logged throughput) |",
             f"| parameters | {facts.params['total']:,} total, {facts.params['non_embedding']:,} non-embedding, "
             f"{facts.params['active']:,} active per token |"]
    if state.get("bad_steps"):
        lines.append(f"| skipped non-finite steps | {state['bad_steps']} |")
    lines += ["", "## Validation", ""]
    logged = [r for r in facts.metrics if "val_loss" in r]
    if logged:
        last = logged[-1]
        lines.append(f"Last logged during training (step {last.get('step')}): loss {last['val_loss']:.4f} nats/token, "
                     f"perplexity {math.exp(min(last['val_loss'], 700)):.2f}.")
    if facts.validation is not None:
        v = facts.validation
        lines += ["", "| loss (nats/token) | perplexity | bits per byte | tokens | bytes |", "|---:|---:|---:|---:|---:|",
                  f"| {v.loss:.4f} | {v.perplexity:.2f} | {v.bits_per_byte:.4f} | {v.tokens:,} | {v.bytes:,} |"]
    if facts.validation_note:
        lines += ["", facts.validation_note]
    lines += ["", "## Benchmarks", ""]
    rows = benchmark_rows(facts.benchmarks)
    if rows:
        lines += ["| task | metric | filter | value | ± stderr | file |", "|---|---|---|---:|---:|---|"]
        lines += [f"| {t} | {m} | {f} | {v:.4f} | {'' if s is None else f'{s:.4f}'} | {n} |" for t, m, f, v, s, n in rows]
    else:
        lines.append("None stored beside the run (`custom-llm eval --ckpt RUN --tasks ... --output RUN/eval/NAME.json`).")
    if facts.sample is not None:
        prompt, text = facts.sample
        lines += ["", "## Sample", "", "Temperature 0.8, top-k 40, seed 0; the prompt, then `|`:", "", "```text",
                  f"{prompt}|{text}", "```"]
    lines += ["", "## Configuration", "", "| model | |", "|---|---|"]
    lines += [f"| {k} | {_cell(facts.model_config[k])} |" for k in MODEL_FIELDS if k in facts.model_config]
    lines += ["", "| training | |", "|---|---|"]
    lines += [f"| {k} | {_cell(facts.train_config[k])} |" for k in TRAIN_FIELDS if k in facts.train_config]
    return "\n".join(lines) + "\n"


def plot_report(facts: RunFacts, path: Path) -> Path:
    """Loss curves (and the benchmark scores, when there are any) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = benchmark_rows(facts.benchmarks)
    fig, axes = plt.subplots(1, 2 if rows else 1, figsize=(12 if rows else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    train = [(r["tokens"], r["loss"]) for r in facts.metrics if "loss" in r and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in facts.metrics if "val_loss" in r and "tokens" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    if facts.validation is not None:
        ax.axhline(facts.validation.loss, color="gray", linestyle=":", label=f"final validation ({facts.validation.loss:.3f})")
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title=facts.name)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    if rows:
        bars = axes[0][1]
        labels = [f"{t}\n{m}" for t, m, *_ in rows]
        bars.barh(labels, [v for _, _, _, v, _, _ in rows], xerr=[s or 0 for *_, s, _ in rows], color="tab:green")
        bars.invert_yaxis()
        bars.set(title="benchmarks", xlabel="value")
        bars.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(facts: RunFacts, out_dir: Path, stem: str = "report") -> tuple[Path, Path]:
    """Write ``stem.md`` and ``stem.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_report(facts, out_dir / f"{stem}.png")
    md = out_dir / f"{stem}.md"
    atomic_write(md, render_markdown(facts, png.name))
    return md, png


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s"


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")
