"""Supervised fine-tuning (SFT) on conversations, through the one training loop.

:func:`run_sft` takes a loaded model and tokenizer (the command line loads ``--init``), gives the
tokenizer the ChatML tokens when it has no chat template of its own (growing the model's vocabulary,
:func:`grow_vocab`), tokenizes and packs the conversations (``data/chat.py``), optionally wraps the
model in LoRA adapters (``model/lora.py``), and runs :func:`~.loop.train_loop` with its own loss
module, data loader and validation. So accumulation, AMP, DDP, exact resume, progress and plots are
the training loop's; what differs is only what a batch is:

* a batch is ``(x, y, document ids)``: ``y`` is ``IGNORE_INDEX`` everywhere but assistant tokens and
  their end-of-turn token, so the loss covers exactly what the model must learn to write;
* with packing, ``document ids`` go to ``model.compute_loss(x, y, document_ids=...)``, so attention
  stays inside each conversation (the model's document-masking hook: a query attends to a key only
  when both carry the same id, on top of causality and any window);
* validation is the same masked loss over held-out conversations.

A LoRA run's checkpoints hold the wrapped model (frozen base, adapters, trained token rows; only the
adapters are in the optimizer), so they resume like any run (the command line also writes the final
one's adapter in PEFT's format, ``adapter_config.json`` + ``adapter_model.safetensors``).

Vocabulary growth: :func:`grow_vocab` initialises each new row to the mean of the existing rows
(Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"): a new token then
starts with the average logit instead of a random one, so the grown model's distribution over the old
tokens stays almost what it was, and the new embedding sits where the model has sensible activations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, from_dict
from ..data.chat import (IGNORE_INDEX, ChatBatches, ChatReport, ChatRows, build_rows, split_conversations,
                         tokenize_conversations)
from ..errors import UserError
from ..fsutil import write_json
from ..model.lora import LoRAConfig, apply_lora
from ..tokenizers import CHAT_TOKENS, CHATML_TEMPLATE
from .config import TrainConfig
from .distributed import all_reduce_sum

log = logging.getLogger("custom_llm.training")

# Fine-tuning defaults (a flag or config value wins); max_steps, warmup and eval cadence follow the data.
# lr: the presets here pre-train at 1e-3..2e-3; for a billion-parameter import pass --train.lr 1e-5..2e-5.
SFT_TRAIN_DEFAULTS = {"batch_size": 8, "lr": 3e-4, "weight_decay": 0.0, "warmup_steps": None, "eval_every": None,
                      "log_every": 5, "min_lr_ratio": 0.1}
LORA_LR = 1e-3


@dataclass
class SFTConfig:
    """What to fine-tune on and how much (the rest is TrainConfig's and LoRAConfig's)."""

    data: Optional[str] = None
    """Conversations: a JSONL file, hf:NAME[:CONFIG], or None for the default stdlib conversations."""
    packing: bool = True
    """Pack several conversations per row (best fit, attention kept inside each); False: one per row."""
    epochs: float = 2.0
    """Passes over the training conversations when train.max_steps is not given."""


@torch.no_grad()
def grow_vocab(model: nn.Module, vocab_size: int) -> nn.Module:
    """Grow ``embed_tokens`` (and an untied ``lm_head``) to ``vocab_size`` rows, new rows = mean of the old."""
    old = model.embed_tokens.weight
    if vocab_size <= old.shape[0]:
        return model
    tied = model.lm_head.weight is old
    embed = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    embed.weight[:old.shape[0]] = old
    embed.weight[old.shape[0]:] = old.mean(dim=0)
    embed.weight.requires_grad_(old.requires_grad)
    model.embed_tokens = embed
    if tied:
        model.lm_head.weight = embed.weight
    else:
        head_old = model.lm_head.weight
        head = nn.Linear(head_old.shape[1], vocab_size, bias=False, device=head_old.device, dtype=head_old.dtype)
        head.weight[:head_old.shape[0]] = head_old
        head.weight[head_old.shape[0]:] = head_old.mean(dim=0)
        head.weight.requires_grad_(head_old.requires_grad)
        model.lm_head = head
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model


def prepare_chat_model(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The tokenizer with a chat template (ChatML tokens added when it has none) and the model grown to it."""
    if tokenizer.chat_template is None:
        tokenizer = tokenizer.with_chat_tokens()
        log.info("tokenizer: added %s (ids %s) and the ChatML template", " ".join(CHAT_TOKENS),
                 [tokenizer.special_tokens()[t] for t in CHAT_TOKENS])
    if tokenizer.vocab_size > model.config.vocab_size:
        log.info("model vocabulary grown from %d to %d rows (new rows: the mean of the old)",
                 model.config.vocab_size, tokenizer.vocab_size)
        grow_vocab(model, tokenizer.vocab_size)
    return model, tokenizer


def chat_token_rows(tokenizer: Any) -> List[int]:
    """Token ids whose embedding rows a LoRA run trains: the ChatML tokens, when that is the template
    (a pre-trained model never saw them as input); none for a template the model was trained with."""
    if tokenizer.chat_template != CHATML_TEMPLATE:
        return []
    return [tokenizer.special_tokens()[t] for t in CHAT_TOKENS]


class SFTLoss(nn.Module):
    """``model.compute_loss`` on (x, y, document ids), for the training loop (and DDP) to call."""

    def __init__(self, model: nn.Module, packing: bool):
        super().__init__()
        self.model, self.packing = model, packing

    def forward(self, x: torch.Tensor, y: torch.Tensor, documents: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None):
        """x, y, documents (M, T), weight (M, 1) -> (loss to backpropagate, LM loss, MoE expert load per layer).

        With ``weight`` (global rows / global learned tokens of the step, from the loader) the micro-batch
        mean becomes ``sum * (global rows / M) / global tokens``: the training step divides it by its k
        micro-steps and DDP averages over W ranks (k * W * M = global rows), so the gradient and the
        reported loss are those of one mean over every learned token of the step, however the rows
        split over micro-batches and ranks (conversations differ in length; a plain mean per
        micro-batch would weigh their tokens unequally).
        """
        loss, lm_loss, load = _loss(self.model, x, y, documents if self.packing else None)
        if weight is None:
            return loss, lm_loss, load
        scale = (y != IGNORE_INDEX).sum() * weight[0, 0] / x.shape[0]
        return loss - lm_loss + lm_loss * scale, lm_loss * scale, load


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, documents: Optional[torch.Tensor]):
    # Without packing a row is one conversation followed by padding, which causal attention never
    # lets a real token see: no document mask is needed.
    out = model.compute_loss(x, y) if documents is None else model.compute_loss(x, y, document_ids=documents)
    return out.loss, out.lm_loss, out.expert_load


@dataclass
class ChatData:
    """The fine-tuning data as the training loop sees it: rows to train on and a masked validation loss."""

    train: ChatRows
    val: ChatRows
    packing: bool
    report: ChatReport

    @torch.no_grad()
    def evaluate(self, parts: Any) -> float:
        """Mean loss per learned token over the validation rows (the training rows when there are none)."""
        rt, tc, model = parts.rt, parts.tc, parts.model
        rows = self.val if len(self.val) else self.train
        n = min(len(rows), tc.eval_batches * tc.eval_batch_size)
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)
        model.eval()
        for start in range(rt.rank * tc.eval_batch_size, n, tc.eval_batch_size * rt.world_size):
            x, y, docs = (torch.from_numpy(a).to(rt.device)
                          for a in rows.batch(np.arange(start, min(start + tc.eval_batch_size, n))))
            with rt.autocast():
                _, lm_loss, _ = _loss(model, x, y, docs if self.packing else None)
            count = (y != IGNORE_INDEX).sum().double()
            total += torch.stack([lm_loss.double() * count, count])
        model.train()
        total = all_reduce_sum(total, rt)
        return float(total[0] / total[1].clamp(min=1))


def prepare_chat_data(tokenizer: Any, sft: SFTConfig, max_seq_len: int, val_fraction: float) -> ChatData:
    """Tokenize, validate, split and pack the conversations; rows hold ``T + 1`` tokens."""
    chats, report = tokenize_conversations(sft.data, tokenizer, max_seq_len)
    train, val = split_conversations(chats, val_fraction)
    if sft.packing:
        seq_len = max_seq_len
    else:  # rows as long as the longest conversation (rounded to 8) instead of the whole context
        seq_len = min(max_seq_len, -(-max(len(c.ids) for c in chats) // 8) * 8)
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)
    data = ChatData(build_rows(train, seq_len, pad, sft.packing), build_rows(val, seq_len, pad, sft.packing),
                    sft.packing, report)
    fill = float((data.train.documents >= 0).mean())
    learned = int(sum(c.mask.sum() for c in train))
    log.info("conversations: %d train / %d validation in %d + %d rows of %d tokens (%.0f%% filled); %d tokens "
             "learned per epoch", len(train), len(val), len(data.train), len(data.val), seq_len + 1, 100 * fill,
             learned)
    return data


def sft_train_config(overrides: dict, data: ChatData, sft: SFTConfig, lora: bool) -> TrainConfig:
    """The run's TrainConfig: fine-tuning defaults, then what the data implies, then ``overrides``."""
    values = {k: v for k, v in SFT_TRAIN_DEFAULTS.items() if v is not None}
    if lora:
        values["lr"] = LORA_LR
    values.update({k: v for k, v in overrides.items() if k != "max_steps"})
    if values.get("curriculum"):
        raise UserError("train.curriculum does not apply to fine-tuning (conversation rows have one length)")
    batch = int(values["batch_size"])
    steps = overrides.get("max_steps") or max(1, math.ceil(sft.epochs * len(data.train) / batch))
    values.setdefault("warmup_steps", max(1, steps // 20))
    values.setdefault("eval_every", max(1, steps // 10))
    values.update(max_steps=steps, seq_len=data.train.ids.shape[1] - 1, curriculum=[])
    return from_dict(TrainConfig, values, prefix="train.")


def build_sft_parts(model: nn.Module, tc: TrainConfig, data: ChatData, lora: Optional[LoRAConfig],
                    token_rows: List[int]) -> Any:
    """The loop's parts for fine-tuning: the (LoRA-wrapped) model, its loss module, optimizer, row loader."""
    from .compiling import use_compile
    from .config import check_run_config
    from .distributed import init_runtime
    from .optim import build_optimizer
    from .parts import TrainingParts, _make_scaler, _wrap
    from .plan import check_batch_splits

    mc: ModelConfig = model.config
    check_run_config(mc, tc)
    if getattr(tc, "parallel", "ddp") == "fsdp":
        raise UserError("fine-tuning runs data-parallel (train.parallel ddp); FSDP is for pre-training here")
    rt = init_runtime(tc.device, tc.precision)
    check_batch_splits(tc, rt.world_size)
    torch.manual_seed(tc.seed)
    model = model.to(rt.device).train()
    if lora is not None:
        apply_lora(model, lora, token_rows)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d alpha=%g on %s: %.3fM trainable parameters (%.2f%%)", lora.r, lora.alpha,
                 ",".join(lora.targets), trainable / 1e6, 100 * trainable / sum(p.numel() for p in model.parameters()))
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps,
                                tc.decay_embeddings, muon_lr=tc.muon_lr, muon_momentum=tc.muon_momentum,
                                muon_weight_decay=tc.muon_weight_decay)
    loader = ChatBatches(data.train, tc.batch_size // rt.world_size, seed=tc.seed, rank=rt.rank,
                         world_size=rt.world_size)
    compiled = use_compile(tc.compile, rt.device)
    if compiled:
        model.compile_blocks()
    net = _wrap(SFTLoss(model, data.packing), mc, tc, rt)
    return TrainingParts(mc, tc, rt, model, net, optimizer, _make_scaler(rt), loader, compiled)


@dataclass
class SFTResult:
    """A finished fine-tune: the loop's result, and the trained model and chat tokenizer."""

    train: Any
    """The training loop's TrainResult (run directory, steps, validation loss, last checkpoint)."""
    model: nn.Module
    tokenizer: Any


def run_sft(model: nn.Module, tokenizer: Any, sft: SFTConfig, train_overrides: dict, out: Path,
            lora: Optional[LoRAConfig] = None, resume: bool = False, progress: bool = True,
            init: Optional[str] = None) -> SFTResult:
    """Fine-tune ``model`` on conversations into the run directory ``out``."""
    from .loop import train_loop

    model, tokenizer = prepare_chat_model(model, tokenizer)
    data = prepare_chat_data(tokenizer, sft, model.config.max_seq_len, train_overrides.get("val_fraction", 0.05))
    tc = sft_train_config(train_overrides, data, sft, lora is not None)
    parts = build_sft_parts(model, tc, data, lora, chat_token_rows(tokenizer))
    out = Path(out)
    if parts.rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "finetune.json", {"init": init, "sft": dataclasses.asdict(sft),
                                           "lora": dataclasses.asdict(lora) if lora else None,
                                           "conversations": {"total": data.report.total, "valid": data.report.valid,
                                                             "invalid": data.report.invalid}})
    result = train_loop(parts, out, data, tokenizer, resume=resume, progress=progress)
    return SFTResult(result, parts.model, tokenizer)
