"""The loop's public seams: TrainState round-trips, plan_step's arithmetic, true config messages,
MoE + LayerDrop together, and checkpoints that are only half there."""

import json
import types

import numpy as np
import pytest
import torch

from custom_llm import ModelConfig
from custom_llm.errors import ConfigError, UserError
from custom_llm.training.config import TrainConfig, resolve_run_config
from custom_llm.training.curriculum import CurriculumState
from custom_llm.training.loop import train
from custom_llm.training.plan import batch_split_problem, check_batch_splits, plan_step
from custom_llm.training.state import TrainState

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def _dataset(n=3000):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 64, size=19)
    tokens = np.concatenate([np.roll(base, i) for i in range(n // 19 + 1)])[:n].astype(np.uint16)
    return types.SimpleNamespace(train=tokens[: n * 9 // 10], val=tokens[n * 9 // 10:])


def _train_config(**kw):
    base = dict(max_steps=4, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=2, eval_batches=1, eval_batch_size=4,
                log_every=1, device="cpu", precision="fp32", sample_tokens=0, save_every=2)
    return TrainConfig(**{**base, **kw})


def test_train_state_round_trips_through_json():
    state = TrainState(step=7, tokens=896, bad_steps=1, consecutive_bad_steps=0, pending_losses=[2.5, 2.25],
                       evals=[{"step": 5, "tokens": 640, "val_loss": 2.9}],
                       curriculum=CurriculumState(stage=1, stage_start_step=4, ppl_history=[18.0],
                                                  transitions=[{"step": 4, "from": 0, "to": 1}]),
                       loader={"step": 7, "rng": {"state": "0x1"}}, rng={"torch_cpu": "AAE="},
                       layerdrop_generator="AAI=", world_size=2, precision="bf16")
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize("broken, message", [({}, "missing key 'step'"), ([], "expected a JSON object"),
                                             ({"step": "x"}, "missing key")])
def test_train_state_names_what_is_wrong(broken, message):
    with pytest.raises(UserError, match=message):
        TrainState.from_dict(broken)


def test_a_saved_checkpoint_holds_exactly_the_state_of_the_run(tmp_path):
    result = train(MODEL, _train_config(), tmp_path / "run", _dataset(), progress=False)
    saved = json.loads((tmp_path / "run" / "ckpt-4" / "trainer_state.json").read_text())
    state = TrainState.from_dict(saved)
    assert (state.step, state.tokens) == (result.step, result.tokens) == (4, 4 * 8 * 16)
    assert [e["step"] for e in state.evals] == [2, 4] and state.pending_losses == []
    assert state.loader["step"] == 4  # one batch drawn per step


def test_plan_step_arithmetic():
    tc = _train_config(batch_size=16, grad_accum_steps=2, max_steps=10, warmup_steps=0, schedule="constant",
                       curriculum=[dict(seq_len=8, batch_size=4, max_steps=2), dict(seq_len=16, batch_size=16)])
    first = plan_step(TrainState(), MODEL, tc, world_size=2)
    assert (first.batch_size, first.seq_len, first.micro_steps, first.micro_batch) == (4, 8, 2, 1)
    assert first.rank_batch == 2 and first.tokens == 32
    assert first.lr_factor == pytest.approx((4 / 16) ** 0.5)  # the sqrt rule for a smaller stage batch
    second = plan_step(TrainState(step=2, curriculum=CurriculumState(stage=1)), MODEL, tc, world_size=1)
    assert (second.batch_size, second.seq_len, second.micro_batch, second.lr_factor) == (16, 16, 8, 1.0)
    plain = plan_step(TrainState(), MODEL, _train_config(seq_len=None), world_size=1)
    assert plain.seq_len == MODEL.max_seq_len


def test_batch_splits_are_checked_in_one_place():
    assert batch_split_problem("train.batch_size", 12, 2, 3) is None
    assert batch_split_problem("train.batch_size", 12, 4, 2) == \
        "train.batch_size (12) must be divisible by world size (4) x train.grad_accum_steps (2)"
    with pytest.raises(UserError, match=r"curriculum\[0\].batch_size \(6\) must be divisible by world size \(4\)"):
        check_batch_splits(_train_config(batch_size=8, curriculum=[dict(seq_len=8, batch_size=6)]), 4)
    with pytest.raises(ConfigError, match=r"train.batch_size \(9\) must be divisible by train.grad_accum_steps \(2\)"):
        _train_config(batch_size=9, grad_accum_steps=2)


def test_config_reports_only_the_real_problem():
    """The issue's example: flags that are right must not be reported as wrong beside the one real problem."""
    flags = dict(d_model=64, n_heads=4, sliding_window=8, window_pattern="SL", n_experts=4, n_shared_experts=1,
                 shared_expert_gate=True, attn_backend="flex", dropout=0.1)
    with pytest.raises(ConfigError) as info:
        resolve_run_config("tiny", None, {"model": flags, "train": {}})
    message = str(info.value)
    assert "flex' does not support attention dropout" in message
    assert "n_heads" not in message and "window_pattern needs" not in message and "shared_expert_gate needs" not in message
    flags.pop("dropout")
    model, _ = resolve_run_config("tiny", None, {"model": flags, "train": {}})
    assert model.window_pattern == "SL" and model.shared_expert_gate


def test_moe_with_layerdrop_trains_and_resumes(tmp_path):
    """The crash of the issue: a skipped MoE block once re-added the previous step's (freed) losses."""
    moe = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, n_experts=4,
                      moe_top_k=2, moe_ffn_dim=32, n_shared_experts=1, shared_expert_gate=True, layerdrop=0.5,
                      layerdrop_schedule="constant")
    result = train(moe, _train_config(max_steps=6), tmp_path / "run", _dataset(), progress=False)
    assert result.step == 6 and result.bad_steps == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len({len(r["moe_load"]) for r in rows if "moe_load" in r}) > 1  # some steps skipped MoE blocks


def test_moe_model_loaded_from_a_checkpoint_has_no_meta_tensors(tmp_path):
    from custom_llm.checkpoint_io import load_checkpoint_model, save_model
    from custom_llm.model import Transformer

    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, n_experts=4,
                         moe_top_k=2, moe_ffn_dim=32)
    save_model(Transformer(config), tmp_path / "ckpt")
    model = load_checkpoint_model(tmp_path / "ckpt")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.randint(0, 64, (2, 8))
    out = model.compute_loss(ids, ids)  # losses come from the forward, on the model's device
    assert out.aux_loss.device.type == "cpu" and sorted(out.expert_load) == [0, 1]


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, caplog):
    from custom_llm.training.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    train(MODEL, _train_config(), run, _dataset(), progress=False)
    optimizer = run / "ckpt-4" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run) == run / "ckpt-2"
    assert "optimizer.safetensors is truncated" in caplog.text and "ckpt-2" in caplog.text
    (run / "ckpt-2" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(run) is None
    result = train(MODEL, _train_config(), run, _dataset(), resume=True, progress=False)  # starts afresh
    assert result.step == 4


def test_resume_past_max_steps_writes_nothing(tmp_path):
    run = tmp_path / "run"
    train(MODEL, _train_config(), run, _dataset(), progress=False)
    before = (run / "metrics.jsonl").read_text()
    result = train(MODEL, _train_config(max_steps=2), run, _dataset(), resume=True, progress=False)
    assert result.step == 4 and (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["mps", "meta", "tpu", "cuda:0x"])
def test_devices_this_machine_lacks_are_named(name):
    from custom_llm.devices import resolve_device

    if torch.cuda.is_available() and name.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="(this machine|it) has: cpu"):
        resolve_device(name)
    assert resolve_device("auto").type in ("cpu", "cuda") and resolve_device("cpu") == torch.device("cpu")
