"""Weight-only quantization: int8 per output channel and int4 in groups, with PyTorch's own kernels.

Batch-1 decoding streams every weight from memory once per token, so its speed is bandwidth over
weight bytes; storing weights in 8 or 4 bits reads 4x or 8x fewer bytes than fp32 (the recipe of
gpt-fast; int4 groups as in GPTQ/AWQ's storage, Frantar et al. 2022, Lin et al. 2023, here with plain
round-to-nearest). Activations stay floating point.

* int8, symmetric per output channel: ``w[n, k] ~= q[n, k] * scale[n]``, q in [-127, 127].
* int4, asymmetric in groups of G input columns: ``w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g]``
  with q in [0, 15] and g = k // G (the convention of PyTorch's int4 kernels).

Stored layout (device-independent, what the safetensors file holds): int8 ``weight`` (N, K) and
``scales`` (N,); int4 ``weight`` uint8 (N, K/2) with column 2j in the high nibble and 2j+1 in the low
one, ``scales`` and ``zeros`` (N, K/G). Kernels want their own layouts, so :func:`pack_for_device`
builds them on the device the model sits on, choosing per device and torch version
(:func:`choose_kernel`):

=================  ==================================================================  ==============
kernel             op                                                                  activations
=================  ==================================================================  ==============
``int8pack``       ``torch._weight_int8pack_mm`` (CPU, CUDA)                           bf16
``int4pack_cpu``   ``torch._weight_int4pack_mm_for_cpu`` on ``_convert_weight_to_int4pack_for_cpu`` (torch >= 2.6)  bf16
``int4pack_cuda``  ``torch._weight_int4pack_mm`` on the tile-packed ``_convert_weight_to_int4pack`` (sm80+)  bf16
``reference``      dequantize, then ``F.linear`` (the readable path every kernel is tested against)  the input's
=================  ==================================================================  ==============

On the CPU the kernels are run on bf16 activations because they are an order of magnitude slower on
fp32 ones (2-core CPU, 1024x384 weight: int8 ~30 us in bf16 against ~1.3 ms in fp32); outputs are
cast back to the input's dtype. Quantized: the attention and MLP projections, shared experts and
routed experts (per expert), the LM head unless ``head=False``; never the embedding, the norms or
the routers (tiny, and routing decisions are sensitive).

Legend: N output features, K input features, G group size, E experts.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
KEEP_FLOAT = ("router", "noise", "shared_expert_gate")  # linear layers never quantized (by name)
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- quantize / dequantize
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q int8 (N, K), scales (N,) fp32): symmetric, per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q (N, K), scales (N,)) -> w (N, K) fp32."""
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> (packed uint8 (N, K/2), scales (N, K/G), zeros (N, K/G)): min-max per group."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G)
    scales = (hi - lo).clamp_min(1e-12) / 15
    zeros = lo + 8 * scales  # the value of q = 8
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in [0, 15] -> uint8 (N, K/2): column 2j in the high nibble, 2j+1 in the low one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int32 (N, K) in [0, 15] (the inverse of :func:`pack_int4`)."""
    high, low = (packed >> 4).to(torch.int32), (packed & 15).to(torch.int32)
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)  # (N, K/2, 2) -> (N, K)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(packed (N, K/2), scales, zeros (N, K/G)) -> w (N, K) fp32."""
    q = unpack_int4(packed).float()  # (N, K)
    N, K = q.shape
    groups = q.reshape(N, scales.shape[1], -1)  # (N, K/G, G)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


# ----------------------------------------------------------------------------------- kernels
def choose_kernel(mode: str, device: torch.device) -> str:
    """The fastest kernel this torch offers for ``mode`` on ``device`` (see the module docstring)."""
    if mode == "int8":
        return "int8pack" if hasattr(torch, "_weight_int8pack_mm") else "reference"
    if device.type == "cpu" and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return "int4pack_cpu"
    if device.type == "cuda" and hasattr(torch, "_convert_weight_to_int4pack"):
        if torch.cuda.get_device_capability(device)[0] >= 8:  # the tile-packed (tinygemm) kernel: sm80+
            return "int4pack_cuda"
    return "reference"


def _inner_k_tiles(in_features: int) -> Optional[int]:
    """Tiles of 16 columns per inner step of the CUDA int4 kernel (8, 4 or 2; None: K does not fit)."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def _kernel_takes(kernel: str, out_features: int, in_features: int) -> bool:
    """Shape rules of the packed int4 kernels: N a multiple of 16 (CPU) or 8 with K in 16-column tiles (CUDA)."""
    if kernel == "int4pack_cpu":
        return out_features % 16 == 0
    if kernel == "int4pack_cuda":
        return out_features % 8 == 0 and _inner_k_tiles(in_features) is not None
    return True


class QuantizedLinear(nn.Module):
    """A linear layer (N, K) with int8 or int4 weights; drop-in for ``nn.Linear`` in inference.

    Persistent buffers are the stored layout (see the module docstring); :meth:`pack` adds the
    kernel's layout for the current device as non-persistent buffers.
    """

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 32,
                 bias: bool = False, device: Optional[torch.device | str] = None):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"quantization mode must be one of {', '.join(MODES)} (got {mode!r})")
        if mode == "int4" and (in_features % group_size or group_size % 2):
            raise UserError(f"int4 group size {group_size} does not divide the {in_features} input features of a layer; "
                            f"choose a group size among {GROUP_SIZES} that does")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.kernel = "reference"
        self._matmul: Callable[[torch.Tensor], torch.Tensor] = self._reference

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mode: str, group_size: int = 32,
                    bias: Optional[torch.Tensor] = None) -> "QuantizedLinear":
        """Quantize a float weight (N, K) (and keep an optional bias (N,) in float)."""
        N, K = weight.shape
        layer = cls(K, N, mode, group_size, bias is not None, device=weight.device)
        with torch.no_grad():
            if mode == "int8":
                q, scales = quantize_int8(weight)
            else:
                q, scales, layer.zeros = quantize_int4(weight, group_size)
            layer.weight, layer.scales = q, scales
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) as fp32, from the stored layout."""
        if self.mode == "int8":
            return dequantize_int8(self.weight, self.scales)
        return dequantize_int4(self.weight, self.scales, self.zeros)

    def pack(self, kernel: Optional[str] = None) -> None:
        """Build the kernel layout for the device the buffers are on (default: :func:`choose_kernel`)."""
        device = self.weight.device
        kernel = kernel or choose_kernel(self.mode, device)
        if not _kernel_takes(kernel, self.out_features, self.in_features):
            kernel = "reference"  # a shape this kernel does not take (a small vocabulary's head, say)
        self.kernel = kernel
        for name in ("packed", "scales_and_zeros", "bf16_scales"):
            self._buffers.pop(name, None)
        if kernel == "int8pack":
            self.register_buffer("bf16_scales", self.scales.to(torch.bfloat16), persistent=False)
            self._matmul = self._int8pack
        elif kernel in ("int4pack_cpu", "int4pack_cuda"):
            if kernel == "int4pack_cpu":
                packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight), 1)
            else:
                packed = torch._convert_weight_to_int4pack(self.weight.contiguous(), _inner_k_tiles(self.in_features))
            pairs = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1)  # (K/G, N, 2)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", pairs.to(torch.bfloat16).contiguous(), persistent=False)
            self._matmul = self._int4pack_cpu if kernel == "int4pack_cpu" else self._int4pack_cuda
        elif kernel == "reference":
            self._matmul = self._reference
        else:
            raise ValueError(f"unknown kernel {kernel!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        y = self._matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.bf16_scales).to(x.dtype)

    def _int4pack_cpu(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros)
        return out.to(x.dtype)

    def _int4pack_cuda(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.mode}{group}, kernel={self.kernel}"


class QuantizedExperts(nn.Module):
    """Routed experts (E SwiGLU experts) with each expert's two projections quantized.

    Offers the dispatch methods ``MoE`` calls on its experts; all run the sorted path (each expert on
    its contiguous slice of token-slots), the path that suits per-expert kernels.
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, mode: str, group_size: int = 32,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        self.n_experts, self.hidden_dim = n_experts, hidden_dim
        self.gate_up_proj = nn.ModuleList(QuantizedLinear(dim, 2 * hidden_dim, mode, group_size, device=device)
                                          for _ in range(n_experts))  # each (2F, C)
        self.down_proj = nn.ModuleList(QuantizedLinear(hidden_dim, dim, mode, group_size, device=device)
                                       for _ in range(n_experts))  # each (C, F)

    @classmethod
    def from_experts(cls, experts: nn.Module, mode: str, group_size: int = 32) -> "QuantizedExperts":
        """Quantize a float :class:`~custom_llm.model.moe.Experts` (weights (E, 2F, C) and (E, C, F))."""
        E, two_f, C = experts.gate_up_proj.shape
        out = cls(E, C, two_f // 2, mode, group_size, device=experts.gate_up_proj.device)
        out.gate_up_proj = nn.ModuleList(QuantizedLinear.from_weight(w, mode, group_size) for w in experts.gate_up_proj)
        out.down_proj = nn.ModuleList(QuantizedLinear.from_weight(w, mode, group_size) for w in experts.down_proj)
        return out

    def forward_sorted(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """x (N, C), expert ids and weights (N, K), slots per expert (E,) -> (N, C)."""
        k = idx.shape[1]
        order = idx.reshape(-1).argsort(stable=True)  # (S,) slots grouped by expert
        token = order // k  # (S,)
        ys = []
        for e, x_e in enumerate(x[token].split(counts.tolist())):  # one host sync
            if x_e.shape[0] > 0:
                gate, up = self.gate_up_proj[e](x_e).chunk(2, dim=-1)  # (n_e, F) each
                ys.append(self.down_proj[e](F.silu(gate) * up))  # (n_e, C)
        y = torch.cat(ys) * weights.reshape(-1)[order, None]  # (S, C)
        return torch.zeros_like(x).index_add_(0, token, y)

    forward_eager = forward_grouped_mm = forward_gathered = forward_sorted  # the names MoE dispatches to


# ------------------------------------------------------------------------------- whole models
def _targets(model: nn.Module, head: bool):
    """(parent, attribute name, module) for every layer to quantize, in module order."""
    from ..model.moe import Experts

    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, Experts):
                yield parent, name, child
            elif isinstance(child, nn.Linear) and name not in KEEP_FLOAT and (head or full != "lm_head"):
                yield parent, name, child


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, head: bool = True,
                   kernel: Optional[str] = None) -> nn.Module:
    """Quantize ``model``'s linear layers in place (see the module docstring) and pack them for its device.

    ``head``: also the LM head (with tied embeddings the embedding keeps its float copy).
    ``kernel``: force one kernel (``"reference"`` for the plain path); default per device.
    """
    check_options(mode, group_size)
    for parent, name, child in list(_targets(model, head)):
        if isinstance(child, nn.Linear):
            bias = child.bias.detach() if child.bias is not None else None
            new = QuantizedLinear.from_weight(child.weight.detach(), mode, group_size, bias)
        else:
            new = QuantizedExperts.from_experts(child, mode, group_size)
        setattr(parent, name, new)
    model.quantization = {"mode": mode, "group_size": group_size, "head": head}
    pack_for_device(model, kernel)
    return model.eval()


def quantized_skeleton(model: nn.Module, mode: str, group_size: int, head: bool) -> nn.Module:
    """Replace the layers :func:`quantize_model` would quantize by empty quantized ones (for loading)."""
    check_options(mode, group_size)
    for parent, name, child in list(_targets(model, head)):
        if isinstance(child, nn.Linear):
            new = QuantizedLinear(child.in_features, child.out_features, mode, group_size, child.bias is not None)
        else:
            E, two_f, C = child.gate_up_proj.shape
            new = QuantizedExperts(E, C, two_f // 2, mode, group_size)
        setattr(parent, name, new)
    model.quantization = {"mode": mode, "group_size": group_size, "head": head}
    return model


def pack_for_device(model: nn.Module, kernel: Optional[str] = None) -> nn.Module:
    """(Re)build every quantized layer's kernel layout for the device it is on; call after ``.to(device)``."""
    kernels = set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.pack(kernel)
            kernels.add(module.kernel)
    log.debug("quantized layers packed for kernels: %s", ", ".join(sorted(kernels)))
    return model


def check_options(mode: str, group_size: int) -> None:
    """UserError for an unknown mode or an int4 group size outside :data:`GROUP_SIZES`."""
    if mode not in MODES:
        raise UserError(f"quantization mode must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))} (got {group_size})")
