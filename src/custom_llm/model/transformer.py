"""The decoder-only transformer: embedding, a stack of blocks, final norm, LM head.

``model(input_ids)`` returns logits; losses come from :meth:`Transformer.compute_loss`, which adds
the mixture-of-experts auxiliary losses that the MoE layers return with their outputs.

Legend: B batch, T time, C d_model, V vocab.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import build_block_mask, document_mask
from .block import Block
from .loss import fused_lm_loss, reference_lm_loss
from .moe import RouterStats
from .norms import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class LossOutput:
    """What :meth:`Transformer.compute_loss` returns. ``loss`` is what to backpropagate."""

    loss: torch.Tensor
    """lm_loss + moe_aux_loss_coef * aux_loss + moe_z_loss_coef * z_loss."""
    lm_loss: torch.Tensor
    """Mean next-token cross-entropy over non-ignored targets (nats)."""
    aux_loss: torch.Tensor
    """Load-balancing loss summed over MoE layers (0 for a dense model), before its coefficient."""
    z_loss: torch.Tensor
    """Router z-loss summed over MoE layers (0 for a dense model), before its coefficient."""
    expert_load: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Per MoE layer that ran (layer index -> (E,)), the detached fraction of token-slots each expert got."""


class Transformer(nn.Module):
    """Decoder-only language model; parameter names follow Hugging Face Llama (minus the ``model.`` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Per-layer choices, decided once here; forward() only follows these lists.
        self.layer_windows = config.layer_windows()
        self.layer_is_moe = config.layer_is_moe()
        self.layerdrop_probs = config.layerdrop_probs()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, i, self.layer_windows[i], self.layer_is_moe[i]) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config.resolved_head_dim, config.rope_theta)
        # LayerDrop decisions come from this generator, seeded identically on every rank so that
        # data-parallel replicas skip the same blocks (see forward()).
        self.layerdrop_generator = torch.Generator().manual_seed(config.layerdrop_seed)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter. The scheme, in one place:

        ======================================  ==============================================
        parameter                               initialisation
        ======================================  ==============================================
        embed_tokens, lm_head (when untied)     normal(0, init_std)
        q/k/v_proj, gate/up_proj, router        normal(0, init_std)
        o_proj, down_proj (residual outputs)    normal(0, init_std / sqrt(2 * n_layers)) (GPT-2)
        linear biases (q/k/v with attn_bias)    0
        RMSNorm weights                         1
        ReZero scales                           0 (each block starts as the identity)
        MoE experts, router, shared experts     MoE.init_weights(std, out_std), same rules
        ======================================  ==============================================
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():  # components with their own parameter kinds (MoE experts)
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights(std, out_std)
        for block in self.layers:
            if block.attn_scale is not None:
                nn.init.zeros_(block.attn_scale)
                nn.init.zeros_(block.mlp_scale)

    def forward(self, input_ids: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                kv_cache: Any = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) (or the last ``logits_to_keep`` positions).

        ``positions`` (T,) or (B, T) are the absolute positions used by RoPE (default 0..T-1);
        generation passes them together with a ``kv_cache`` (see Attention.forward).
        """
        x = self.hidden_states(input_ids, positions=positions, kv_cache=kv_cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)  # (B, T, V)

    def hidden_states(self, input_ids: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                      kv_cache: Any = None) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, C), the LM head's input."""
        return self._trunk(input_ids, positions, kv_cache)[0]

    def _trunk(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None, kv_cache: Any = None,
               document_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[int, RouterStats]]:
        """input_ids (B, T) -> (final-normed hidden states (B, T, C), router stats of each MoE layer that ran).

        ``document_ids`` (B, T): packed sequences; a token attends only to earlier tokens of its own
        document (same id). RoPE positions need no restart: attention scores see relative positions only.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rope(positions)  # (T, D) or (B, T, D), shared by every layer
        x = self.embed_tokens(input_ids)  # (B, T, C)
        masks = self._attention_masks(T, input_ids.device, kv_cache, document_ids)
        stats: dict[int, RouterStats] = {}
        drop = self._layerdrop_decisions()
        for i, block in enumerate(self.layers):
            if drop[i]:
                continue
            mask = masks[self.layer_windows[i]] if masks else None
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, layer_stats = checkpoint(block, x, cos, sin, kv_cache, mask, use_reentrant=False)
            else:
                x, layer_stats = block(x, cos, sin, kv_cache, mask)
            if layer_stats is not None:
                stats[i] = layer_stats
        return self.norm(x), stats

    def _attention_masks(self, length: int, device: torch.device, kv_cache: Any,
                         document_ids: Optional[torch.Tensor]) -> Optional[dict]:
        """The attention masks of this forward, one per distinct window, built here, outside the (possibly
        compiled) blocks: flex block masks where flex runs, boolean (B, 1, T, T) masks for packed
        documents otherwise, None where each layer's own causal/window masking suffices. Flex does not
        run in generation with a KV cache, nor in CPU training (torch has no flex backward on the CPU;
        SDPA takes the same mask)."""
        if kv_cache is not None:
            if document_ids is not None:
                raise ValueError("document_ids (packed sequences) are for training and scoring, not with a KV cache")
            return None
        windows = set(self.layer_windows)
        flex = self.config.attn_backend == "flex" and not (device.type == "cpu" and torch.is_grad_enabled()
                                                            and self.training)
        if flex:
            return {window: build_block_mask(window, length, device, document_ids) for window in windows}
        if document_ids is None:
            return None
        return {window: document_mask(document_ids, window) for window in windows}

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile every block in place (identical blocks share one compiled graph).

        Compiling the blocks rather than ``forward`` also speeds up :meth:`compute_loss`, which calls
        :meth:`hidden_states`; the fused loss stays eager (it is already a few large matmuls).
        """
        for block in self.layers:
            block.compile(**compile_kwargs)

    def _layerdrop_decisions(self) -> list[bool]:
        """Which blocks to skip in this forward: never in eval; drawn from the model's own generator.

        Under DDP every rank draws the same decisions (same seed, same number of draws), so the
        skipped blocks' parameters get no gradient on any rank; the trainer wraps the model with
        ``find_unused_parameters=True`` whenever layerdrop > 0.
        """
        if not self.training or self.config.layerdrop == 0:
            return [False] * len(self.layers)
        u = torch.rand(len(self.layers), generator=self.layerdrop_generator).tolist()
        return [ui < p for ui, p in zip(u, self.layerdrop_probs)]

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                     fused: bool = True, document_ids: Optional[torch.Tensor] = None) -> LossOutput:
        """Next-token cross-entropy of the model on input_ids (B, T) against targets (B, T), plus MoE losses.

        ``fused`` computes the LM head and cross-entropy chunk by chunk without materialising the
        logits (see loss.py); ``fused=False`` is the plain reference, with the same value and gradients.
        ``document_ids`` (B, T): several documents packed in each row, attention kept inside each.
        """
        hidden, stats = self._trunk(input_ids, document_ids=document_ids)
        loss_fn = fused_lm_loss if fused else reference_lm_loss
        lm_loss = loss_fn(hidden.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), ignore_index=ignore_index)
        aux_loss = sum((s.aux_loss for s in stats.values()), lm_loss.new_zeros(()))
        z_loss = sum((s.z_loss for s in stats.values()), lm_loss.new_zeros(()))
        loss = lm_loss + self.config.moe_aux_loss_coef * aux_loss + self.config.moe_z_loss_coef * z_loss
        return LossOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss,
                          expert_load={i: s.expert_load for i, s in stats.items()})

    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``non_embedding`` (without embedding / LM head) and ``active``
        (per token: routed experts counted at top_k / n_experts)."""
        total = sum(p.numel() for p in self.parameters())  # shared (tied) tensors counted once
        embedding = self.embed_tokens.weight.numel()
        if not self.config.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        inactive = 0
        for block in self.layers:
            routed = getattr(block.mlp, "routed_expert_params", None)
            if routed is not None:
                inactive += routed() * (1 - self.config.moe_top_k / self.config.n_experts)
        return {"total": total, "non_embedding": total - embedding, "active": int(round(total - inactive))}

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) matmul FLOPs per token at sequence length T: the MFU numerator.

        6 x the weight-matrix parameters a token passes through (every linear layer, LM head included
        even when tied; routed experts at top_k / n_experts; not the embedding lookup, norms or biases,
        which are no matrix multiplies) + 12 x n_heads x head_dim x T_eff per layer for the scores and
        the weighted values, T_eff = min(T, the layer's window) (PaLM, Chowdhery et al. 2022, appendix
        B, with the window cap). As in PaLM, a causal layer counts all T keys, not the half it needs.
        """
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for module in self.modules():
            routed = getattr(module, "routed_expert_params", None)
            if routed is not None:
                matmul_params += routed() * cfg.moe_top_k / cfg.n_experts
        keys = [seq_len if window is None else min(seq_len, window) for window in self.layer_windows]
        return float(6 * matmul_params + 12 * cfg.n_heads * cfg.resolved_head_dim * sum(keys))
