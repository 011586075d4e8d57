"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of LLMs").

A wrapped linear computes ``base(x) + B(A(dropout(x))) * alpha / r`` with A (r, in) and B (out, r);
B starts at zero, so the wrapped model starts exactly equal to the base model. Only A and B train:
:func:`apply_lora` freezes every other parameter, so neither gradients nor optimizer state exist for
the base weights. Parameter names follow PEFT (``q_proj.base_layer.weight``, ``q_proj.lora_A.weight``,
``q_proj.lora_B.weight``) so adapters map one to one onto PEFT's files (see ``interop/peft.py``).

:class:`TrainableRows` trains selected rows of the embedding (and of an untied LM head) on top of a
frozen matrix, for tokens added to the vocabulary (the chat tokens): PEFT's ``trainable_token_indices``,
where the trained rows replace the base rows.

Targets are module names: ``q_proj k_proj v_proj o_proj`` (attention) and ``gate_proj up_proj
down_proj`` (dense MLP and shared experts); routed experts are batched tensors, not linears, and
stay frozen. Legend: B batch, T time, C in features, O out features, R rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Which linears get adapters, and their rank, scale and dropout."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt: any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or 'all'."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t for t in self.targets.replace(",", " ").split() if t]
        if list(self.targets) == ["all"]:
            self.targets = list(ATTENTION_TARGETS + MLP_TARGETS)
        unknown = sorted(set(self.targets) - set(ATTENTION_TARGETS + MLP_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets: unknown {unknown or 'empty list'} (choose from "
                             f"{', '.join(ATTENTION_TARGETS + MLP_TARGETS)} or all)")
        if self.r < 1:
            raise ValueError(f"lora.r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """alpha / r, the factor on B A."""
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        # Kept as a (saved) buffer so that a checkpoint of the wrapped model describes itself.
        self.register_buffer("lora_scaling", torch.tensor(alpha / r, dtype=torch.float32, device=device))
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default; B = 0: starts as base
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (O, C), for code that reads ``.weight`` of a linear."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, O)."""
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.lora_scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix (O, C): scaling * B @ A."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.lora_scaling.float()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear with the update folded into its weight."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


class TrainableRows(nn.Module):
    """An embedding or LM head whose rows ``token_indices`` are trainable copies (PEFT's trainable tokens).

    ``weight`` is the frozen base matrix with those rows replaced, so both ``forward`` and code that
    reads ``.weight`` (the fused loss) see the trained rows. A tied head shares the embedding's rows
    and matrix, and then holds neither in its own state (the tied matrix is saved once, as usual).
    """

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int], share_with: "TrainableRows" = None):
        super().__init__()
        indices = torch.tensor(sorted(set(token_indices)), dtype=torch.long, device=base_layer.weight.device)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        if share_with is None:
            self.base_layer = base_layer
            self.register_buffer("token_indices", indices)
            self.trainable_tokens_delta = nn.Parameter(base_layer.weight.detach()[indices].clone())
            self._shared: List[TrainableRows] = []
        else:
            self._shared = [share_with]  # a list keeps it out of this module's parameters and state dict

    @property
    def source(self) -> "TrainableRows":
        """The module that owns the base matrix and the trained rows (itself, or the tied embedding's)."""
        return self._shared[0] if self._shared else self

    @property
    def rows(self) -> torch.Tensor:
        """The trained rows (N, C)."""
        return self.source.trainable_tokens_delta

    @property
    def weight(self) -> torch.Tensor:
        """The base matrix with the trained rows in place (V, C)."""
        src = self.source
        return src.base_layer.weight.index_copy(0, src.token_indices, src.rows.to(src.base_layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:
            return F.embedding(x, self.weight)  # (B, T) -> (B, T, C)
        return F.linear(x, self.weight)  # (B, T, C) -> (B, T, V)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The full matrix to write back into a plain layer."""
        return self.weight.detach().clone()


def lora_from_state(state: Dict[str, torch.Tensor]) -> Tuple[LoRAConfig, List[int]]:
    """The LoRA settings and trained token ids a wrapped model's state dict was made with (for loading)."""
    names = [k for k in state if k.endswith(".lora_A.weight")]
    if not names:
        raise ValueError("no LoRA tensors in this state dict")
    r = state[names[0]].shape[0]
    scaling = float(state[names[0].replace("lora_A.weight", "lora_scaling")])
    targets = sorted({k.split(".")[-3] for k in names})
    indices = state.get("embed_tokens.token_indices")
    return LoRAConfig(r=r, alpha=scaling * r, targets=targets), ([] if indices is None else indices.tolist())


def lora_targets(model: nn.Module, targets: Sequence[str]) -> Iterator[Tuple[str, nn.Linear]]:
    """(qualified name, linear) for every ``nn.Linear`` whose own name is one of ``targets``."""
    wanted = set(targets)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, config: LoRAConfig, trainable_token_indices: Sequence[int] = (),
               head_rows: bool = True) -> nn.Module:
    """Freeze ``model``, wrap its target linears in :class:`LoRALinear`, optionally train some token rows
    (of the embedding, and of an untied LM head unless ``head_rows`` is False; a tied head follows)."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = list(lora_targets(model, config.targets))
    if not found:
        raise ValueError(f"no linear layer named {', '.join(config.targets)} in the model")
    for name, linear in found:
        _replace(model, name, LoRALinear(linear, config.r, config.alpha, config.dropout))
    if trainable_token_indices:
        tied = model.lm_head.weight is model.embed_tokens.weight
        embed = TrainableRows(model.embed_tokens, trainable_token_indices)
        model.embed_tokens = embed
        if tied or head_rows:
            model.lm_head = TrainableRows(model.lm_head, trainable_token_indices, share_with=embed if tied else None)
    return model


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable adapter tensors by name (``...q_proj.lora_A.weight``, ``embed_tokens.trainable_tokens_delta``)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The frozen base model's tensors under their plain names (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return strip_adapters(model.state_dict())


def strip_adapters(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A wrapped model's state dict reduced to the base model's tensors under their plain names."""
    out = {}
    for name, tensor in state.items():
        if any(part in name for part in (".lora_A.", ".lora_B.", "lora_scaling", "trainable_tokens_delta",
                                         "token_indices")):
            continue
        out[name.replace(".base_layer.", ".").replace("base_layer.", "")] = tensor
    return out


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into plain weights (in place); the model is then an ordinary one again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    rows = [(n, m) for n, m in ((n, getattr(model, n, None)) for n in ("embed_tokens", "lm_head"))
            if isinstance(m, TrainableRows)]
    owners = [(name, module) for name, module in rows if not module._shared]
    for name, module in owners:
        module.base_layer.weight.data.copy_(module.merged_weight())
    for name, module in owners:
        setattr(model, name, module.base_layer)
    if rows and getattr(model.config, "tie_embeddings", False):
        head = nn.Linear(model.embed_tokens.weight.shape[1], model.embed_tokens.weight.shape[0], bias=False,
                         device="meta")
        head.weight = model.embed_tokens.weight
        model.lm_head = head
    return model
