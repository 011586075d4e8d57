"""Each sampler against a hand-computed case; reproducibility with an explicit generator."""

import math

import pytest
import torch

from custom_llm.errors import UserError
from custom_llm.generation import (SamplingParams, apply_repetition_penalty, min_p_filter, process_logits,
                                   sample, sample_from_logits, top_k_filter, top_p_filter)

INF = float("-inf")


def logits_of(probs):
    return torch.tensor([probs]).log()


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    # seen & positive: divided; seen & negative: multiplied; unseen untouched
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.25]]))


def test_temperature():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    got = process_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(got, torch.tensor([[2.0, 4.0, 8.0]]))


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0]])
    assert top_k_filter(logits, 2).tolist() == [[INF, 5.0, 3.0, 3.0, INF]]  # tie with the 2nd kept
    assert top_k_filter(logits, 1).tolist() == [[INF, 5.0, INF, INF, INF]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()


def test_top_p_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]
    kept = top_p_filter(logits_of(probs), 0.75).isfinite()[0].tolist()
    assert kept == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.75
    kept = top_p_filter(logits_of(probs), 0.85).isfinite()[0].tolist()
    assert kept == [False, True, True, True]  # 0.8 < 0.85: one more
    kept = top_p_filter(logits_of(probs), 0.1).isfinite()[0].tolist()
    assert kept == [False, True, False, False]  # the top token always stays


def test_min_p_relative_to_top():
    probs = [0.05, 0.5, 0.15, 0.3]
    kept = min_p_filter(logits_of(probs), 0.25).isfinite()[0].tolist()  # threshold 0.125
    assert kept == [False, True, True, True]
    kept = min_p_filter(logits_of(probs), 0.5).isfinite()[0].tolist()  # threshold 0.25
    assert kept == [False, True, False, True]


def test_processors_compose_in_hf_order():
    """Penalty before temperature before top-k: checked on one hand-computed row."""
    logits = torch.tensor([[4.0, 2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, False, True, False]])
    params = SamplingParams(temperature=2.0, top_k=2, repetition_penalty=4.0)
    got = process_logits(logits, params, seen)  # penalty: [1, 2, -8, 1]; /T: [.5, 1, -4, .5]; top-2 keeps ties
    assert got.tolist() == [[0.5, 1.0, INF, 0.5]]


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(), seen=seen).tolist() == [0]
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3, 0.0])
    logits = probs.log().expand(20000, 4)
    draws = sample_from_logits(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = logits_of([0.05, 0.5, 0.15, 0.3]).expand(5000, 4)
    draws = sample(logits, SamplingParams(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1, 3}


def test_same_seed_same_tokens():
    logits = torch.randn(64, 100)
    params = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01)
    a = sample(logits, params, torch.Generator().manual_seed(3))
    b = sample(logits, params, torch.Generator().manual_seed(3))
    c = sample(logits, params, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(min_p=-0.1), dict(min_p=1.1), dict(repetition_penalty=0.0),
                                    dict(temperature=math.nan)])
def test_invalid_values_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SamplingParams(**kwargs)
