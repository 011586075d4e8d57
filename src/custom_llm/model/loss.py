"""Language-model loss: the LM head and cross-entropy fused and chunked.

The plain way, ``F.cross_entropy(h @ W.T, y)``, materialises the full (N, V) logits, their log-softmax,
and in the backward a zero-filled (N, V) gradient: several passes over the largest tensor of the step
(64 MB for 2048 tokens x 8192 vocab in fp32; 2 GB at 16K tokens x 32K vocab). Here the rows are
processed in chunks: each chunk's logits are computed, reduced to its loss, and turned straight into
its gradient (softmax - one_hot) while still in cache, which is then pushed through the LM head. The
forward therefore already holds the gradients of the hidden states and of the head's weight, and the
backward only scales them. This is the idea of Liger Kernel's fused linear cross-entropy and of
"Cut Your Losses" (Wijmans et al. 2024), in plain PyTorch.

:func:`reference_lm_loss` is the readable version, and the tests hold the two together.

Legend: N tokens (B * T flattened), C d_model, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Bytes of fp32 logits per chunk: small enough to stay in the CPU allocator's reused blocks (large
# fresh allocations pay page faults each step), large enough for efficient GPU matmuls.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}


def perplexity(loss: float) -> float:
    """exp(loss) of a mean loss in nats, clamped at exp(50) so a diverged run's value stays a finite number."""
    return math.exp(min(loss, 50.0))


def reference_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T against targets, the plain way."""
    logits = F.linear(hidden, weight)  # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def _chunk_loss_and_grad(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ok: torch.Tensor,
                         needs_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk: (summed cross-entropy of its valid rows, d loss_sum / d logits (n, V) or None).

    h (n, C) and w (V, C) in the compute dtype, y (n,) targets, ok (n,) which rows count.
    """
    logits = (h @ w.t()).float()  # (n, V)
    safe_y = torch.where(ok, y, torch.zeros_like(y))
    target_logit = logits.gather(1, safe_y.unsqueeze(1)).squeeze(1)  # (n,), before logits is overwritten
    # logsumexp by hand, in place, so the chunk's exponentials are computed once and reused as the
    # softmax: exp(logits - max) / sum = softmax, max + log(sum) = logsumexp.
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exp = logits.sub_(row_max).exp_()  # (n, V), overwrites logits
    sum_exp = exp.sum(dim=-1, keepdim=True)  # (n, 1)
    lse = (row_max + sum_exp.log()).squeeze(1)  # (n,)
    loss = ((lse - target_logit) * ok).sum()
    if not needs_grad:
        return loss, None
    # d(loss_row)/d(logits) = softmax - one_hot, zero for ignored rows; computed in place.
    grad = exp.mul_(ok.unsqueeze(1) / sum_exp)
    grad[torch.arange(grad.shape[0], device=grad.device), safe_y] -= ok.float()
    return loss, grad


_COMPILED_CHUNKS: dict[str, Callable] = {}


def _chunk_function(device_type: str) -> Callable:
    """The chunk body, compiled on CUDA: eagerly it is ~8 passes over each (n, V) chunk (matmul, cast,
    gather, max, subtract, exp, sum, scale), compiled the elementwise work fuses into a few kernels. On
    the CPU it stays eager (a compile costs more than small CPU runs gain)."""
    if device_type != "cuda":
        return _chunk_loss_and_grad
    if device_type not in _COMPILED_CHUNKS:
        _COMPILED_CHUNKS[device_type] = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _COMPILED_CHUNKS[device_type]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over non-ignored rows; gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, dtype, needs_grad):
        # hidden (N, C), weight (V, C), targets (N,). ``needs_grad``: decided by the caller, since grad
        # mode is always off in here and ctx.needs_input_grad stays true under torch.no_grad().
        chunk = _chunk_function(hidden.device.type)
        w = weight.to(dtype)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)  # (n, C)
            chunk_loss, grad = chunk(h, w, targets[start:start + chunk_rows], valid[start:start + chunk_rows],
                                     needs_grad)
            loss += chunk_loss
            if grad is not None:
                grad = grad.to(dtype)
                grad_hidden[start:start + chunk_rows] = (grad @ w).to(hidden.dtype)
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)  # (V, n) @ (n, C), accumulated in place
                else:
                    grad_weight += (grad.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        gh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of hidden (N, C) through an LM head weight (V, C) against targets (N,).

    Same value and gradients as :func:`reference_lm_loss` (fp32 round-off aside), without ever
    holding the (N, V) logits. Honours autocast: the matmuls run in the autocast dtype.
    """
    if chunk_rows is None:
        per_row = weight.shape[0] * 4
        chunk_rows = max(1, CHUNK_BYTES.get(hidden.device.type, 1 << 30) // per_row)
    dtype = _compute_dtype(hidden)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):  # the Function casts explicitly
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, dtype, needs_grad)
