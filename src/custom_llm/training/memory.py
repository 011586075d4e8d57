"""A memory and time planner for a training run: what one GPU holds under DDP and FSDP (ZeRO-2/3).

Everything is counted from this trainer's own choices, per GPU, in bytes:

==================  ==========================================================================
parameters          fp32 master weights (4 B each): whole under DDP, 1/W under FSDP
gradients           fp32 (4 B): whole under DDP, 1/W under FSDP (reduce-scattered)
optimizer           fp32 states: AdamW 2 per parameter, Lion 1, Muon 1 (its AdamW groups 2)
ddp buckets         DDP's flat all-reduce buffers: one more fp32 copy of the gradients
gathered            FSDP: unsharded weights of the units in flight (bf16 under the GPU policy):
                    ZeRO-3 the root (embedding and head, used at both ends) and two blocks (the
                    current one and the prefetched next), plus one unit's unsharded fp32
                    gradients; ZeRO-2 (reshard_after_forward off) every unit's weights from the
                    forward to the backward
activations         what autograd keeps for the backward (below), for one micro-batch
==================  ==========================================================================

Activations per token and layer, as element counts (Korthikanti et al. 2022 do the same count for
GPT-3 blocks; this is the count for these blocks, SDPA without materialised scores): each RMSNorm
keeps its input, normalised input and output (3 C, so 6 C per block), attention q, k, v and its
output (2 H*D + 2 K*D), the SwiGLU MLP gate, silu(gate), up and their product (4 F); an MoE layer
instead keeps per routed slot 4 F_e + 3 C (k slots per token) and 2 E router values. The model
adds 3 C per token (the final norm, whose output is the loss's input) and the fused loss's fp32
LM-head gradient (V x C), computed in the forward. SDPA given a window mask also keeps its
probabilities (H*T per token; flex attention does not). Under bf16 autocast the matmul tensors are
2 B and the norms' (on the fp32 residual stream) 4 B; fp32 is 4 B throughout. Gradient
checkpointing keeps each block's input (C) plus, in the backward, one block's recomputed activations.
These counts are held to autograd's saved tensors on the CPU in fp32 (tests/test_memory_plan.py); the
bf16 sizes are reasoning until tests/gpu/test_cuda_fsdp.py runs on a GPU.

FLOPs per step are ``Transformer.flops_per_token`` x tokens (the MFU convention of DESIGN.md), and
the step time is FLOPs / (GPUs x peak x MFU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import ModelConfig

STRATEGIES = ("ddp", "zero2", "zero3")
"""DDP; FSDP with reshard_after_forward off (ZeRO-2-like) or on (ZeRO-3)."""
OPTIMIZER_STATES = {"adamw": 2, "lion": 1}


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a model, built on the meta device (no memory)."""

    params: int
    """Every parameter once (tied weights once)."""
    block: int
    """Parameters of the largest block (one FSDP unit)."""
    root: int
    """Parameters of the root FSDP unit: embedding, final norm, untied LM head."""
    muon_matrices: int
    """Parameters Muon would train (the blocks' matrices except routers)."""
    flops_per_token: float
    """Training matmul FLOPs per token at the planned sequence length."""


def model_sizes(mc: ModelConfig, seq_len: int) -> ModelSizes:
    """Counts for ``mc`` from a model built on the meta device."""
    from ..model import Transformer
    from .optim import muon_matrices

    with torch.device("meta"):
        model = Transformer(mc)
    params = model.num_params()["total"]
    blocks = max(sum(p.numel() for p in block.parameters()) for block in model.layers)
    root = params - sum(p.numel() for p in model.layers.parameters())
    return ModelSizes(params, blocks, root, sum(p.numel() for p in muon_matrices(model)),
                      model.flops_per_token(seq_len))


def layer_activation_bytes(mc: ModelConfig, micro_batch: int, seq_len: int, precision: str) -> list[int]:
    """Bytes autograd keeps for the backward of each block, for one micro-batch (see the module docstring)."""
    C, H, K, D = mc.d_model, mc.n_heads, mc.n_kv_heads, mc.resolved_head_dim
    wide = 4  # the residual stream and the norms stay fp32 under autocast
    narrow = 2 if precision == "bf16" else 4  # matmul inputs and outputs
    attention = (2 * H * D + 2 * K * D) * narrow
    sizes = []
    for window, is_moe in zip(mc.layer_windows(), mc.layer_is_moe()):
        if is_moe:
            mlp = mc.moe_top_k * (4 * mc.resolved_moe_ffn_dim + 3 * C) * narrow + 2 * mc.n_experts * 4
            if mc.n_shared_experts:
                mlp += 4 * mc.resolved_shared_ffn_dim * narrow
        else:
            mlp = 4 * mc.resolved_ffn_dim * narrow
        # SDPA given an explicit (window) mask keeps the attention probabilities; flex attention does not
        scores = H * seq_len * narrow if window is not None and mc.attn_backend != "flex" else 0
        sizes.append(micro_batch * seq_len * (6 * C * wide + attention + mlp + scores))
    return sizes


def activation_bytes(mc: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool) -> int:
    """Bytes of activations at the backward's peak for one micro-batch: every block's, or under gradient
    checkpointing each block's input plus one block's recomputed activations."""
    layers = layer_activation_bytes(mc, micro_batch, seq_len, precision)
    # the final norm's input, normalised input and output (the loss's input); the fused loss's LM-head gradient (V, C)
    outside = micro_batch * seq_len * 3 * mc.d_model * 4 + mc.vocab_size * mc.d_model * 4
    if checkpointing:
        return len(layers) * micro_batch * seq_len * mc.d_model * 4 + max(layers) + outside
    return sum(layers) + outside


def measure_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """What autograd keeps for the backward of ``model.compute_loss(input_ids, input_ids)``: the bytes of
    every distinct storage saved by the forward, parameters left out (the measurement the formula is held to)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.compute_loss(input_ids, input_ids)
    return sum(saved.values())


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of one strategy at one micro-batch, and whether it fits."""

    strategy: str
    micro_batch: int
    params: int
    grads: int
    optimizer: int
    buffers: int
    """DDP buckets, or FSDP's gathered weights and unsharded gradients in flight."""
    activations: int
    total: int
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)


def optimizer_bytes(sizes: ModelSizes, optimizer: str) -> int:
    """fp32 optimizer state bytes of the whole model."""
    if optimizer == "muon":  # one momentum buffer per matrix, AdamW's two moments for the rest
        return 4 * (sizes.muon_matrices + 2 * (sizes.params - sizes.muon_matrices))
    return 4 * OPTIMIZER_STATES[optimizer] * sizes.params


def plan_memory(mc: ModelConfig, sizes: ModelSizes, strategy: str, gpus: int, micro_batch: int, seq_len: int,
                precision: str, optimizer: str, checkpointing: bool, gpu_memory: float,
                headroom: float = 0.9) -> MemoryPlan:
    """Per-GPU memory of ``strategy`` on ``gpus`` GPUs; fits when the total is within ``headroom`` x memory
    (the rest for the CUDA context, allocator fragmentation and communication buffers)."""
    P, W = sizes.params, gpus
    gathered_bytes = 2 if precision == "bf16" else 4  # FSDP's MixedPrecisionPolicy gathers bf16 weights
    if strategy == "ddp":
        params, grads, opt, buffers = 4 * P, 4 * P, optimizer_bytes(sizes, optimizer), 4 * P
    else:
        params, grads, opt = -(-4 * P // W), -(-4 * P // W), -(-optimizer_bytes(sizes, optimizer) // W)
        unsharded_grads = 4 * max(sizes.block, sizes.root)  # one unit's fp32 gradients before reduce-scatter
        if strategy == "zero3":  # the root stays gathered from the embedding to the head; a block and the next
            buffers = (sizes.root + 2 * sizes.block) * gathered_bytes + unsharded_grads
        else:
            buffers = P * gathered_bytes + unsharded_grads
        if W == 1:
            buffers = 0
    acts = activation_bytes(mc, micro_batch, seq_len, precision, checkpointing)
    total = params + grads + opt + buffers + acts
    return MemoryPlan(strategy, micro_batch, params, grads, opt, buffers, acts, total, total <= headroom * gpu_memory)


def largest_micro_batch(mc: ModelConfig, sizes: ModelSizes, strategy: str, gpus: int, seq_len: int, precision: str,
                        optimizer: str, checkpointing: bool, gpu_memory: float, limit: int = 4096) -> int:
    """The largest micro-batch (sequences per GPU per micro-step) that fits; 0 when not even one does."""
    best, low, high = 0, 1, limit
    while low <= high:
        mid = (low + high) // 2
        if plan_memory(mc, sizes, strategy, gpus, mid, seq_len, precision, optimizer, checkpointing, gpu_memory).fits:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def step_time(sizes: ModelSizes, global_batch: int, seq_len: int, gpus: int, peak_flops: float,
              mfu: float) -> tuple[float, float, float]:
    """(FLOPs per step, seconds per step, tokens per second over all GPUs) at the stated MFU."""
    flops = sizes.flops_per_token * global_batch * seq_len
    seconds = flops / (gpus * peak_flops * mfu)
    return flops, seconds, global_batch * seq_len / seconds


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '141G' or a plain number of bytes -> bytes (GB taken as GiB, as GPU memory is quoted)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], None)
    try:
        return float(value[:-1]) * scale if scale else float(value)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB)") from None


def describe(plan: MemoryPlan) -> str:
    """One line of a plan in GiB."""
    g = 2**30
    return (f"{plan.strategy:>5}  params {plan.params / g:7.2f}  grads {plan.grads / g:7.2f}  optimizer "
            f"{plan.optimizer / g:7.2f}  buffers {plan.buffers / g:7.2f}  activations {plan.activations / g:7.2f}  "
            f"total {plan.total / g:7.2f} GiB" + ("" if plan.fits else "  (does not fit)"))

