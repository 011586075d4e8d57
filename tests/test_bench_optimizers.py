"""The optimizers bench case's bookkeeping: each run's settings and the first evaluation reaching a target."""

import pytest

from custom_llm.bench.optimizer_case import _first_reaching, _overrides
from custom_llm.training import TRAIN_PRESETS, resolve_run_config


def test_runs_differ_only_in_the_optimizer_and_its_translation():
    preset = TRAIN_PRESETS["shakespeare-char-cpu"]
    assert _overrides("adamw", "shakespeare-char-cpu") == {"optimizer": "adamw"}
    lion = _overrides("lion", "shakespeare-char-cpu")  # Chen et al.: lr / 3, weight decay x 3
    assert lion["optimizer"] == "lion" and lion["lr"] == pytest.approx(preset["lr"] / 3)
    assert lion["weight_decay"] == pytest.approx(3 * preset["weight_decay"])
    muon = _overrides("muon", "tiny")
    assert muon["optimizer"] == "muon"
    _, tc = resolve_run_config("tiny", None, {"model": {}, "train": muon})  # a valid run config
    assert tc.optimizer == "muon" and tc.lr == TRAIN_PRESETS["tiny"]["lr"]


def test_first_evaluation_reaching_the_target():
    evals = [{"tokens": 100, "val_loss": 3.0}, {"tokens": 200, "val_loss": 2.5}, {"tokens": 300, "val_loss": 2.6}]
    assert _first_reaching(evals, 2.5)["tokens"] == 200
    assert _first_reaching(evals, 2.9)["tokens"] == 200
    assert _first_reaching(evals, 2.0) is None
