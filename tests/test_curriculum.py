"""Curriculum decisions at their edges, LR rescaling, and the state machine."""

import math

import pytest

from custom_llm.training.curriculum import (CurriculumStage, CurriculumState, advance_reason, batch_lr_factor,
                                            update)

STAGE = CurriculumStage(seq_len=64, batch_size=8)


def reason(history, steps=10, stage=STAGE, patience=2, threshold=0.01, is_last=False):
    return advance_reason(stage, history, steps, patience=patience, threshold=threshold, is_last=is_last)


def test_needs_more_than_patience_measurements():
    assert reason([]) is None
    assert reason([10.0, 10.0]) is None  # 2 measurements, patience 2: nothing to compare against yet
    assert reason([10.0, 10.0, 10.0]) == "plateau"


def test_plateau_threshold_edge():
    # best before = 10; best of the last two must be below 10 * (1 - 0.01) = 9.9 to count as progress
    assert reason([10.0, 9.95, 9.91]) == "plateau"
    assert reason([10.0, 9.95, 9.89]) is None
    assert reason([10.0, 12.0, 9.5]) is None  # one good recent measurement is enough
    assert reason([10.0, 9.0, 9.5, 9.2]) == "plateau"  # best before = 9.0


def test_target_and_max_steps():
    stage = CurriculumStage(seq_len=64, batch_size=8, target_ppl=20.0, max_steps=100)
    assert reason([25.0], steps=50, stage=stage) is None
    assert reason([20.0], steps=50, stage=stage) == "target"
    assert reason([], steps=99, stage=stage) is None
    assert reason([], steps=100, stage=stage) == "max_steps"


def test_last_stage_never_advances():
    stage = CurriculumStage(seq_len=64, batch_size=8, target_ppl=1e9, max_steps=1)
    assert reason([5.0, 5.0, 5.0], steps=1000, stage=stage, is_last=True) is None


def test_batch_lr_factor_rules():
    assert batch_lr_factor("sqrt", 32, 8) == pytest.approx(2.0)
    assert batch_lr_factor("linear", 32, 8) == pytest.approx(4.0)
    assert batch_lr_factor("none", 32, 8) == 1.0
    assert batch_lr_factor("sqrt", 8, 32) == pytest.approx(0.5)


def test_update_records_transitions_and_resets_history():
    stages = [CurriculumStage(16, 4, max_steps=5), CurriculumStage(32, 8)]
    state = CurriculumState()
    assert update(state, stages, 3, 100, 2.0, patience=2, threshold=0.01) is None
    assert state.ppl_history == [pytest.approx(math.exp(2.0))]
    transition = update(state, stages, 5, 200, None, patience=2, threshold=0.01)
    assert transition == {"step": 5, "tokens": 200, "from": 0, "to": 1, "reason": "max_steps"}
    assert state.stage == 1 and state.stage_start_step == 5 and state.ppl_history == []
    for step in range(6, 20):  # last stage: stays whatever happens
        assert update(state, stages, step, 0, 3.0, patience=1, threshold=0.5) is None
    assert CurriculumState.from_dict(state.to_dict()) == state
    assert update(CurriculumState(), [], 1, 1, 1.0, patience=1, threshold=0.0) is None
