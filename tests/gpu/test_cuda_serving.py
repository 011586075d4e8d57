"""CUDA-only: the continuous-batching engine's compiled decode step (CUDA graphs over all slots)."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.generation import SamplingParams
from custom_llm.generation.batch import BatchEngine

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("window", [None, 16])
def test_compiled_batch_engine_equals_eager(window):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=128,
                                    sliding_window=window, init_std=0.2)).cuda().eval()
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 20, [9, 8], [4] * 3, list(range(60, 90))]
    eager = BatchEngine(model, max_batch=4, compile=False).generate_batch(prompts, 40)
    compiled_engine = BatchEngine(model, max_batch=4, compile=True)
    assert compiled_engine.generate_batch(prompts, 40) == eager
    assert compiled_engine._step is not None  # it really ran compiled (no eager fallback)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    alone = compiled_engine.generate_batch([prompts[1]], 30, params, seeds=[5])[0]
    beside = compiled_engine.generate_batch(prompts[:4], 30, params, seeds=[1, 5, 2, 3])[1]
    assert alone == beside
