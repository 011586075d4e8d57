"""Fully sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under DDP every rank holds the whole model, its gradients and its optimizer state. FSDP shards all
three over the W ranks (ZeRO-3, Rajbhandari et al. 2020; PyTorch FSDP, Zhao et al. 2023): each
parameter becomes a DTensor of which a rank keeps 1/W along dim 0; a block's full weights are
all-gathered just before its forward (and again before its backward when ``reshard_after_forward``),
and its gradients are reduce-scattered, so each rank's optimizer updates only its own shard.

Units: one per transformer block, then the root (the Transformer itself), which keeps the token
embedding, the final norm and the LM head together so tied weights stay one tensor. The root's
all-gather runs in ``forward`` and in ``compute_loss`` (registered as an FSDP forward method).

On one rank there is nothing to shard: the model trains unwrapped and only the checkpoint format
(a DCP folder, see dcp.py) follows ``train.parallel``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

PARALLEL = ("ddp", "fsdp")


def fsdp_problems(parallel: str, optimizer: str, precision: str) -> list[str]:
    """Why train.parallel fsdp cannot run with this optimizer or precision (empty when it can)."""
    if parallel != "fsdp":
        return []
    problems = []
    if optimizer == "muon":
        problems.append("train.parallel fsdp does not support train.optimizer muon (Newton-Schulz needs each "
                        "whole matrix, FSDP gives a rank a slice of rows); use adamw or lion, or train.parallel ddp")
    if not _torch_has_fsdp2_and_safetensors_dcp():
        problems.append(f"train.parallel fsdp needs torch.distributed.fsdp.fully_shard and DCP's safetensors storage "
                        f"(torch.distributed.checkpoint.hf_storage), which torch {torch.__version__} lacks; upgrade "
                        "torch or use train.parallel ddp")
    if precision == "fp16":
        problems.append("train.parallel fsdp does not support train.precision fp16 (its gradient scaler would "
                        "need sharded inf checks); use bf16 or fp32")
    return problems


def _torch_has_fsdp2_and_safetensors_dcp() -> bool:
    try:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard_model(model: nn.Module, device: torch.device, world_size: int, precision: str,
                reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 in place: each block, then the root (embedding, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()  # CPU (gloo) and fp32: parameters and reductions in fp32
    if device.type == "cuda" and precision == "bf16":  # gathered weights in bf16, gradients reduced in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "compute_loss")


def _fsdp_modules(net: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in net.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_gradient_sync(net: nn.Module) -> Iterator[None]:
    """Accumulate this micro-step's gradients locally: DDP's ``no_sync``, or FSDP without reduce-scatter."""
    units = _fsdp_modules(net)
    if not units:
        with net.no_sync():
            yield
        return
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm (before clipping) and clip to ``max_norm``; sharded (DTensor) gradients count
    every rank's shard: the norm of the local shards is reduced over the mesh, then made a plain tensor."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
    if hasattr(total, "full_tensor"):  # a DTensor with a pending reduction over the ranks
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank stores: the local shard of a DTensor, the whole of a plain tensor."""
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()
