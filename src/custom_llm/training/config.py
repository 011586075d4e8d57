"""Training configuration (:class:`TrainConfig`), run presets, and how a run's config is assembled.

A run config is ``{"model": ModelConfig fields, "train": TrainConfig fields}`` (YAML or JSON). It is
assembled in this order, later winning: preset (model preset + train defaults) < config file <
command-line overrides. Every field is documented where it is declared; ``custom-llm train`` builds
its ``--train.FIELD`` flags and their help from these declarations.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import MAX_SEED, MODEL_PRESETS, ModelConfig, _is_int, _is_number, from_dict, load_config_file, to_dict
from ..errors import ConfigError
from ..tokenizers import KINDS
from .curriculum import LR_RULES, CurriculumStage
from .fsdp import PARALLEL, fsdp_problems
from .optim import OPTIMIZERS
from .plan import batch_split_problem
from .schedules import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZER_KINDS = KINDS


@dataclass
class TrainConfig:
    """How to train: data, batch, optimizer, schedule, curriculum, evaluation, checkpoints."""

    # --- data --------------------------------------------------------------------------------
    data: list[str] = field(default_factory=list)
    """Training text: files, directories or .jsonl files; empty means the embedded default corpus (Python's stdlib sources)."""
    tokenizer: str = "auto"
    """Tokenizer to train on the data: 'bpe', 'char', or 'auto' (the data package decides)."""
    text_field: str = "text"
    """Field holding the text in .jsonl inputs."""
    extensions: Optional[str] = None
    """Comma-separated file extensions read from directories (e.g. '.py,.md'); None reads every file."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (chosen by a hash of the document name)."""
    cache_dir: Optional[str] = None
    """Where tokenizers and token arrays are cached; None means the data package's default."""

    # --- batch and length ------------------------------------------------------------------------
    max_steps: int = 1000
    """Optimizer steps of the run; the learning-rate schedule is laid out over them."""
    batch_size: int = 32
    """Global batch: sequences per optimizer step, over all ranks and micro-steps."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step; each rank's micro-batch is batch_size / (world size * grad_accum_steps)."""
    seq_len: Optional[int] = None
    """Training sequence length; None means model.max_seq_len. Curriculum stages override it."""
    seed: int = 0
    """Seed of the weights' initialisation, data order and dropout."""

    # --- optimizer and schedule ------------------------------------------------------------------
    optimizer: str = "adamw"
    """'adamw', 'lion' (Chen et al. 2023; use a 3-10x smaller lr and larger weight_decay) or 'muon' (Jordan et al. 2024: Muon for the blocks' matrices, AdamW at lr for the rest)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    schedule: str = "cosine"
    """'cosine' (warmup + cosine decay), 'wsd' (warmup-stable-decay) or 'constant' (warmup then flat)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to the peak learning rate."""
    decay_fraction: float = 0.2
    """WSD only: fraction of max_steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (never on norms, biases or ReZero scales)."""
    decay_embeddings: bool = False
    """Apply weight decay to the token embedding (and tied LM head) too."""
    beta1: float = 0.9
    """First-moment coefficient (Lion: interpolation coefficient)."""
    beta2: float = 0.95
    """Second-moment coefficient (Lion: momentum coefficient)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    muon_lr: float = 0.02
    """Muon only: peak learning rate of the block matrices (lr is the AdamW groups'); same schedule."""
    muon_momentum: float = 0.95
    """Muon only: Nesterov momentum coefficient."""
    muon_weight_decay: float = 0.0
    """Muon only: decoupled weight decay of the block matrices (weight_decay is the AdamW groups')."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    # --- precision and device --------------------------------------------------------------------
    precision: str = "auto"
    """'fp32', 'bf16' (autocast), 'fp16' (autocast + gradient scaler), or 'auto': bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (CUDA when available)."""
    compile: Optional[bool] = None
    """torch.compile the model; None means on for CUDA, off for CPU."""
    parallel: str = "ddp"
    """With more than one rank: 'ddp' (every rank holds the whole model, gradients and optimizer state) or 'fsdp' (FSDP2 ZeRO-3: each rank holds 1/W of them; checkpoints become a resharding DCP folder). See training/fsdp.py."""
    reshard_after_forward: bool = True
    """FSDP only: free the gathered parameters after each block's forward (ZeRO-3, least memory) or keep them for the backward (ZeRO-2 style, one all-gather fewer per block)."""

    # --- curriculum ------------------------------------------------------------------------------
    curriculum: list[CurriculumStage] = field(default_factory=list)
    """Stages [{seq_len, batch_size, lr_scale, target_ppl, max_steps}, ...]; empty: one fixed stage (seq_len, batch_size)."""
    curriculum_patience: int = 2
    """Evaluations without enough improvement before moving to the next stage."""
    curriculum_threshold: float = 0.01
    """Relative perplexity improvement that counts as progress (0.01 = 1%)."""
    curriculum_lr_rule: str = "sqrt"
    """Learning-rate rescaling when a stage's batch size differs from batch_size: 'sqrt', 'linear' or 'none'."""

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    eval_every: int = 100
    """Measure validation loss every this many steps (and at the end); 0 disables periodic evaluation."""
    eval_batches: int = 8
    """Batches (of eval_batch_size sequences of model.max_seq_len tokens) in one validation pass."""
    eval_batch_size: int = 8
    """Sequences per validation batch."""
    log_every: int = 10
    """Write a metrics.jsonl row every this many steps."""
    save_every: int = 0
    """Write a checkpoint every this many steps (and always at the end); 0: only at the end."""
    keep_checkpoints: int = 3
    """Keep this many newest checkpoints (older ones are deleted)."""
    max_bad_steps: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    time_limit: Optional[float] = None
    """Stop (saving a checkpoint) after this many minutes of training; None: no limit."""
    sample_tokens: int = 64
    """Tokens of sample text generated at the end of the run (0: none)."""

    def __post_init__(self) -> None:
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_batches", "eval_batch_size",
                     "log_every", "keep_checkpoints", "max_bad_steps", "curriculum_patience"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"train.{name} must be an integer >= 1")
        need(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, f"train.seed must be an integer in [0, {MAX_SEED}]")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, f"train.{name} must be an integer >= 0")
        need(self.seq_len is None or (_is_int(self.seq_len) and self.seq_len >= 1), "train.seq_len must be a positive integer or null")
        need(_is_number(self.lr) and self.lr > 0, "train.lr must be > 0")
        need(_is_number(self.muon_lr) and self.muon_lr > 0, "train.muon_lr must be > 0")
        need(_is_number(self.muon_momentum) and 0 <= self.muon_momentum < 1, "train.muon_momentum must be in [0, 1)")
        need(_is_number(self.muon_weight_decay) and self.muon_weight_decay >= 0, "train.muon_weight_decay must be >= 0")
        for name in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            need(_is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, f"train.{name} must be in [0, 1]")
        need(_is_number(self.val_fraction) and 0 < self.val_fraction < 1, "train.val_fraction must be in (0, 1)")
        for name in ("weight_decay", "grad_clip", "eps", "curriculum_threshold"):
            need(_is_number(getattr(self, name)) and getattr(self, name) >= 0, f"train.{name} must be >= 0")
        need(self.time_limit is None or (_is_number(self.time_limit) and self.time_limit > 0), "train.time_limit must be > 0 minutes or null")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("device", DEVICES), ("tokenizer", TOKENIZER_KINDS), ("curriculum_lr_rule", LR_RULES)):
            need(getattr(self, name) in choices, f"train.{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")
        need(self.parallel in PARALLEL, f"train.parallel must be one of {', '.join(PARALLEL)} (got {self.parallel!r})")
        problems.extend(fsdp_problems(self.parallel, self.optimizer, self.precision))
        if _is_int(self.batch_size) and _is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1:
            problems.extend(filter(None, [batch_split_problem("train.batch_size", self.batch_size, 1,
                                                              self.grad_accum_steps)]))
        stages = []
        for i, stage in enumerate(self.curriculum if isinstance(self.curriculum, list) else []):
            if isinstance(stage, dict):  # built in Python with plain dicts
                try:
                    stage = from_dict(CurriculumStage, stage, prefix=f"train.curriculum[{i}].")
                except ConfigError as exc:
                    problems.append(str(exc))
                    continue
            stages.append(stage)
        self.curriculum = stages
        for i, stage in enumerate(self.curriculum):
            problems.extend(_stage_problems(i, stage, self.grad_accum_steps))
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data, prefix="train.")


def _stage_problems(i: int, stage: CurriculumStage, accum: Any) -> list[str]:
    name = f"train.curriculum[{i}]"
    problems = []
    for key in ("seq_len", "batch_size"):
        if not (_is_int(getattr(stage, key)) and getattr(stage, key) >= 1):
            problems.append(f"{name}.{key} must be a positive integer")
    if not (_is_number(stage.lr_scale) and stage.lr_scale > 0):
        problems.append(f"{name}.lr_scale must be > 0")
    if stage.target_ppl is not None and not (_is_number(stage.target_ppl) and stage.target_ppl > 0):
        problems.append(f"{name}.target_ppl must be > 0 or null")
    if stage.max_steps is not None and not (_is_int(stage.max_steps) and stage.max_steps >= 1):
        problems.append(f"{name}.max_steps must be an integer >= 1 or null")
    if not problems and _is_int(accum) and accum >= 1:
        problems.extend(filter(None, [batch_split_problem(f"{name}.batch_size", stage.batch_size, 1, accum)]))
    return problems


def check_run_config(model: ModelConfig, train: TrainConfig) -> None:
    """Cross-checks between the model and train configs (each is already valid on its own)."""
    problems = []
    seq_lens = [("train.seq_len", train.seq_len)] + [(f"train.curriculum[{i}].seq_len", s.seq_len)
                                                      for i, s in enumerate(train.curriculum)]
    for name, value in seq_lens:
        if value is not None and value > model.max_seq_len:
            problems.append(f"{name} ({value}) must not exceed model.max_seq_len ({model.max_seq_len})")
    if train.parallel == "fsdp" and model.layerdrop > 0:
        problems.append("train.parallel fsdp does not support model.layerdrop > 0 (a skipped block would leave its "
                        "shards out of the gradient reduction); use train.parallel ddp or model.layerdrop 0")
    if problems:
        raise ConfigError("invalid run config: " + "; ".join(problems))


# --- presets: a model preset plus training defaults that suit it ------------------------------

_TINY = dict(max_steps=800, batch_size=16, lr=2e-3, warmup_steps=40, eval_every=80, eval_batches=4, log_every=10,
             save_every=400, time_limit=8.0,
             curriculum=[dict(seq_len=64, batch_size=16, max_steps=200), dict(seq_len=128, batch_size=16)])

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The default job: ~1.4M tokens, sequence-length warmup 64 -> 128. About 6 minutes on a quiet
    # 2-core CPU with data preparation; time_limit is the safety net on slower machines.
    "tiny": _TINY,
    "small": dict(max_steps=5000, batch_size=32, lr=1e-3, warmup_steps=200, eval_every=250, save_every=1000),
    "base": dict(max_steps=20000, batch_size=64, grad_accum_steps=4, lr=6e-4, warmup_steps=1000,
                 eval_every=500, eval_batches=20, save_every=2000),
    "moe-small": dict(_TINY, max_steps=200, save_every=100, time_limit=None,
                      curriculum=[dict(seq_len=64, batch_size=16, max_steps=100), dict(seq_len=128, batch_size=16)]),
    # nanoGPT's shakespeare_char recipe (its published validation loss: ~1.47): characters, the last
    # 10% of the text held out, 5000 AdamW steps of 64 x 256, lr 1e-3 cosine to 1e-4 after 100 warmup
    # steps, beta2 0.99, weight decay 0.1 on every matrix (embedding too), clipping 1.0. Pass the text
    # with --data; a GPU run (82M training tokens).
    "shakespeare-char": dict(tokenizer="char", val_fraction=0.1, max_steps=5000, batch_size=64, seq_len=256,
                             lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                             decay_embeddings=True, grad_clip=1.0, eval_every=250, eval_batches=20,
                             eval_batch_size=64, log_every=50, save_every=1000),
    # Its CPU variant (published: ~1.88 in ~3 minutes on a laptop): 2000 steps of 12 x 64.
    "shakespeare-char-cpu": dict(tokenizer="char", val_fraction=0.1, max_steps=2000, batch_size=12, seq_len=64,
                                 lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                                 decay_embeddings=True, grad_clip=1.0, eval_every=250, eval_batches=20,
                                 eval_batch_size=12, log_every=50, save_every=1000),
}
# The same recipe with Muon for the blocks' matrices, AdamW at the recipe's settings for the rest.
# muon_lr 0.015: validation 1.587 against 1.606 at Muon's default 0.02 and AdamW's 1.674, same 2000 steps.
TRAIN_PRESETS["shakespeare-char-cpu-muon"] = dict(TRAIN_PRESETS["shakespeare-char-cpu"], optimizer="muon",
                                                  muon_lr=0.015)

RUN_PRESETS = tuple(MODEL_PRESETS)


def resolve_run_config(preset: Optional[str], file_data: Optional[dict],
                       overrides: dict[str, dict[str, Any]]) -> tuple[ModelConfig, TrainConfig]:
    """Assemble (ModelConfig, TrainConfig): preset < config file < overrides; every problem in one error.

    ``file_data`` is a parsed run-config file ({"model": {...}, "train": {...}}); ``overrides`` is
    {"model": {...}, "train": {...}} of already-typed values (from the command line).
    """
    problems = []
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        sections["model"].update(MODEL_PRESETS[preset])
        sections["train"].update(TRAIN_PRESETS.get(preset, {}))
    if file_data:
        unknown = [k for k in file_data if k not in sections]
        problems.extend(f"unknown top-level key {k!r} (expected 'model' and 'train')" for k in unknown)
        for key in sections:
            value = file_data.get(key) or {}
            if not isinstance(value, dict):
                problems.append(f"'{key}' must be a mapping")
            else:
                sections[key].update(value)
    for key in sections:
        sections[key].update(overrides.get(key, {}))
    model = _build(ModelConfig, sections["model"], "model.", problems)
    train = _build(TrainConfig, sections["train"], "train.", problems)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    check_run_config(model, train)
    return model, train


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    """``from_dict`` of the finished section, its problems added to ``problems`` (None on failure).

    The section is validated whole, once: unknown keys and mistyped values first, then the
    dataclass's own checks of the values together, so every message is about what was asked for
    (checking fields one at a time against the defaults of the others reports problems that are not there).
    """
    try:
        return from_dict(cls, data, prefix=prefix)
    except ConfigError as exc:
        problems.extend(p for p in _strip(str(exc)).split("; ") if p not in problems)
    return None


def _strip(message: str) -> str:
    for head in ("invalid config: ", "invalid train config: ", "invalid model config: "):
        message = message.replace(head, "")
    return message


def run_config_dict(model: ModelConfig, train: TrainConfig) -> dict:
    """The ``config.json`` content of a checkpoint."""
    return {"format": "custom-llm", "model": model.to_dict(), "train": train.to_dict()}


def dataclass_fields(cls: type) -> list[str]:
    """Field names of a config dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


__all__ = ["TrainConfig", "CurriculumStage", "TRAIN_PRESETS", "RUN_PRESETS", "resolve_run_config",
           "check_run_config", "run_config_dict", "dataclass_fields", "load_config_file"]
