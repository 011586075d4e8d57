"""A whole training job as ``custom-llm train`` runs it: config, data, resume/init, train, summary, sample.

The order of config sources is preset < config file < command-line overrides. With ``--resume`` the
checkpoint's own config is the base instead (the architecture cannot change), and the config file's
and flags' train fields still apply on top, so a resumed run follows the same schedule unless told
otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional


from ..checkpoint_io import parameter_shapes, read_json
from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import check_run_dir_free, check_writable_dir, run_dir_lock
from .checkpoint import latest_checkpoint, remove_leftovers
from .config import TrainConfig, check_run_config, load_config_file, resolve_run_config
from .compiling import use_compile
from .distributed import barrier, init_runtime, shutdown
from .loop import TrainResult, train

log = logging.getLogger("custom_llm.training")


@dataclasses.dataclass
class Job:
    """A resolved training job, ready to run."""

    model: ModelConfig
    train: TrainConfig
    out: Path
    resume: bool = False
    init: Optional[str] = None
    model_overrides: dict = dataclasses.field(default_factory=dict)
    """--model.* flags, applied on top of an --init model's config."""


def resolve_job(preset: Optional[str], config_file: Optional[str], overrides: dict[str, dict[str, Any]],
                out: Optional[str], resume: bool, init: Optional[str]) -> Job:
    """Validate everything (raising one ConfigError/UserError) before anything is written."""
    file_data = load_config_file(config_file) if config_file else None
    if preset is None and config_file is None:
        preset = "tiny"
    name = preset or Path(config_file).stem
    out_dir = Path(out) if out else Path("runs") / name
    check_run_dir_free(out_dir)  # a run writing there now: say so before judging its checkpoints
    ckpt = latest_checkpoint(out_dir)
    # With --resume/--init the weights fix the architecture: the config file's model section (often the
    # one that started the run) is not applied, explicit --model.* flags are, if they keep the parameters.
    model_overrides = dict(overrides.get("model", {}))
    if resume and ckpt is not None:  # the checkpoint's config is the base; fields given now apply on top
        stored = read_json(ckpt / "config.json")
        explicit = dict((file_data or {}).get("train") or {})
        explicit.update(overrides.get("train", {}))
        model, train_cfg = resolve_run_config(None, {"model": stored["model"], "train": stored.get("train", {})},
                                              {"model": model_overrides, "train": explicit})
        check_same_parameters(ModelConfig.from_dict(stored["model"]), model, f"--resume from {ckpt}")
    else:
        model, train_cfg = resolve_run_config(preset, file_data, overrides)
        if ckpt is not None:
            raise UserError(f"{out_dir} already holds checkpoints ({ckpt.name}); pass --resume to continue that "
                            f"run or --out to start a new one elsewhere")
    if init is not None and resume and ckpt is not None:
        raise UserError("--init and --resume together: --resume already continues from the run's own checkpoint")
    from ..data.tokens import default_cache_dir

    check_writable_dir(out_dir, "--out")
    check_writable_dir(train_cfg.cache_dir or default_cache_dir(), "data cache")
    return Job(model, train_cfg, out_dir, resume, init, model_overrides)


def check_same_parameters(base: ModelConfig, changed: ModelConfig, source: str) -> None:
    """A UserError naming the fields when ``changed`` would not have the parameters of ``base``.

    Weights come from ``source`` (--init or --resume), so only fields that keep every parameter's
    name and shape (dropout, layerdrop, attention backend, window, RoPE theta, ...) may change.
    """
    if parameter_shapes(base) != parameter_shapes(changed):
        fields = [f.name for f in dataclasses.fields(ModelConfig) if getattr(base, f.name) != getattr(changed, f.name)]
        raise UserError(f"{source}: model fields {', '.join(fields)} would change the parameters the weights "
                        f"come from; only fields that keep them (e.g. dropout, layerdrop) can be overridden")


def _apply_model_overrides(base: ModelConfig, overrides: dict, source: str) -> ModelConfig:
    """``base`` (an --init model's config) with the run's model fields on top, parameters unchanged."""
    if not overrides:
        return base
    changed = ModelConfig.from_dict({**base.to_dict(), **overrides})
    check_same_parameters(base, changed, source)
    return changed


def _prepare(job: Job, tokenizer: Any):
    from ..data import prepare_data

    tc = job.train
    return prepare_data(tc.data or None, tokenizer=tokenizer, tokenizer_kind=tc.tokenizer,
                        vocab_size=job.model.vocab_size, cache_dir=tc.cache_dir, val_fraction=tc.val_fraction,
                        text_field=tc.text_field, extensions=tc.extensions, min_tokens=_longest_seq_len(job) + 1)


def run_job(job: Job, progress: bool = True, init: Optional[tuple[ModelConfig, dict, Any]] = None,
            sample: Optional[Callable[[Path, Any, list[int], int], str]] = None) -> TrainResult:
    """Prepare data (rank 0 first, others then read its cache), train, then print a summary on rank 0.

    ``init``: (model config, weights, tokenizer) loaded from ``job.init`` by the caller (the CLI, which
    may read Hugging Face folders; this layer does not). ``sample(checkpoint, tokenizer, prompt ids,
    n)``: the text printed as a sample at the end (none when None).
    """
    runtime = init_runtime(job.train.device, job.train.precision)
    try:
        with run_dir_lock(job.out) if runtime.is_main else nullcontext():  # before anything is written there
            return _run(job, runtime, progress, init, sample)
    finally:
        shutdown(runtime)  # leave the process group (torchrun) once the job is over


def _run(job: Job, runtime: Any, progress: bool, init: Optional[tuple[ModelConfig, dict, Any]],
         sample: Optional[Callable[[Path, Any, list[int], int], str]]) -> TrainResult:
    from ..data import unigram_entropy

    if job.train.compile:  # an impossible explicit --train.compile true fails before any work (default: build_parts)
        use_compile(job.train.compile, runtime.device)
    init_state, tokenizer = None, None
    resume_from = latest_checkpoint(job.out) if job.resume else None
    resuming = resume_from is not None
    if job.init is not None:
        if init is None:
            raise ValueError("run_job: a job with init needs the loaded (config, weights, tokenizer)")
        init_model_config, init_state, tokenizer = init
        job.model = _apply_model_overrides(init_model_config, job.model_overrides, f"--init {job.init}")
        check_run_config(job.model, job.train)
    elif resuming:
        from ..tokenizers import load_tokenizer

        tokenizer = load_tokenizer(resume_from)
    elif job.resume:
        log.info("--resume: no complete checkpoint in %s yet; starting a new run there", job.out)
    for turn in range(2):  # rank 0 builds the tokenizer/token cache, the others read it afterwards
        if (turn == 0) == runtime.is_main:
            tokenizer, dataset = _prepare(job, tokenizer)
        barrier(runtime)
    if tokenizer.vocab_size != job.model.vocab_size:
        if job.init is not None or resuming:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{job.model.vocab_size}")
        log.info("model vocab_size set to the tokenizer's %d (config asked for %d)", tokenizer.vocab_size,
                 job.model.vocab_size)
        job.model = dataclasses.replace(job.model, vocab_size=tokenizer.vocab_size)
    if runtime.is_main:
        job.out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(job.out)
    entropy = unigram_entropy(dataset.train)
    log.info("data: %d train / %d validation tokens; unigram entropy %.3f nats/token", len(dataset.train),
             len(dataset.val), entropy)
    result = train(job.model, job.train, job.out, dataset, tokenizer, resume=job.resume, init_state=init_state,
                   progress=progress, reference_loss=entropy)
    if runtime.is_main:
        _summarise(result, entropy, job, tokenizer, [int(t) for t in dataset.val[:16]], sample)
    return result


def _summarise(result: TrainResult, entropy: float, job: Job, tokenizer: Any, prompt: list[int],
               sample: Optional[Callable[[Path, Any, list[int], int], str]]) -> None:
    """Print validation loss beside the unigram entropy, and a short sample."""
    lines = [f"run directory: {result.run_dir} (checkpoint {result.checkpoint.name if result.checkpoint else '-'})",
             f"steps {result.step}, tokens {result.tokens:,}, skipped non-finite steps {result.bad_steps}"]
    if result.val_loss is not None:
        verdict = "better than" if result.val_loss < entropy else "NOT better than"
        lines.append(f"validation loss {result.val_loss:.3f} nats/token (perplexity {math.exp(result.val_loss):.1f}) "
                     f"vs unigram entropy {entropy:.3f} nats/token: {verdict} token frequencies alone")
    print("\n".join(lines))
    if sample is not None and job.train.sample_tokens > 0 and result.checkpoint is not None \
            and result.checkpoint.is_dir():
        text = sample(result.checkpoint, tokenizer, prompt, job.train.sample_tokens)
        print(f"sample (temperature 0.8, top-k 40; prompt = the first {len(prompt)} validation tokens, then '|'):"
              f"\n{text}")


def _longest_seq_len(job: Job) -> int:
    lengths = [job.train.seq_len or job.model.max_seq_len] + [s.seq_len for s in job.train.curriculum]
    return max(lengths)
