"""Learning-rate schedules: values at the edges of warmup, plateau and decay."""

import math

import pytest

from custom_llm.training.schedules import constant, lr_multiplier, warmup_cosine, warmup_stable_decay


def test_warmup_is_linear_and_reaches_one():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(4, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)


def test_cosine_decays_from_one_to_min_ratio():
    assert warmup_cosine(10, 100, 10, min_ratio=0.1) == pytest.approx(1.0)
    midpoint = 10 + 45
    assert warmup_cosine(midpoint, 100, 10, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10, min_ratio=0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [warmup_cosine(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup():
    assert warmup_cosine(0, 10, 0, min_ratio=0.0) == pytest.approx(1.0)
    assert warmup_cosine(5, 10, 0, min_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_plateau_then_linear_decay():
    # 100 steps, 10 warmup, last 20 decay: plateau on steps 10..79, decay over 80..99.
    assert warmup_stable_decay(9, 100, 10, 0.2) == pytest.approx(1.0)
    assert warmup_stable_decay(10, 100, 10, 0.2) == 1.0
    assert warmup_stable_decay(79, 100, 10, 0.2) == 1.0
    assert warmup_stable_decay(80, 100, 10, 0.2) == pytest.approx(1 - 1 / 20)
    assert warmup_stable_decay(89, 100, 10, 0.2) == pytest.approx(0.5)
    assert warmup_stable_decay(99, 100, 10, 0.2) == pytest.approx(0.0)
    assert warmup_stable_decay(99, 100, 10, 0.2, min_ratio=0.1) == pytest.approx(0.1)


def test_constant_and_dispatch():
    assert constant(3, 100, 4) == pytest.approx(1.0)
    assert constant(50, 100, 4) == 1.0
    assert lr_multiplier("wsd", 89, 100, 10, decay_fraction=0.2, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 100, 100, 10, min_ratio=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        lr_multiplier("step", 0, 10, 1)
