"""CUDA-only: the int8 and tile-packed int4 kernels against dequantize-then-matmul (skipped without a GPU)."""

import pytest
import torch

from custom_llm.generation.quant import QuantizedLinear, choose_kernel

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 128)])
def test_cuda_kernel_matches_the_reference(mode, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    fast = QuantizedLinear.from_weight(w, mode, group).cuda()
    fast.pack()
    assert fast.kernel == choose_kernel(mode, torch.device("cuda")) != "reference"
    ref = QuantizedLinear.from_weight(w, mode, group).cuda()
    ref.pack("reference")
    x = torch.randn(4, 512, generator=g).cuda().bfloat16()
    got, expected = fast(x).float(), ref(x.float())
    assert (got - expected).norm() / expected.norm() < 1e-2
