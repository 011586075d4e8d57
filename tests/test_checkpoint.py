"""Checkpoint files: optimizer state round trip, atomic directories, leftovers, refusal of NaN weights."""

import json

import pytest
import torch

from custom_llm import ModelConfig, Transformer, UserError
from custom_llm.training.checkpoint import (decode_bytes, encode_bytes, flatten_optimizer_state, latest_checkpoint,
                                            list_complete, load_optimizer, load_trainer_state, load_weights,
                                            save_checkpoint, unflatten_optimizer_state)
from custom_llm.training.optim import build_optimizer

CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)


def trained(name="adamw"):
    model = Transformer(CONFIG)
    opt = build_optimizer(model, name, 1e-3, 0.1, (0.9, 0.95))
    for _ in range(2):
        x = torch.randint(0, 64, (2, 8))
        model.compute_loss(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_optimizer_state_round_trip(name):
    model, opt = trained(name)
    tensors, rest = flatten_optimizer_state(opt.state_dict())
    json.dumps(rest)  # the non-tensor part must be plain JSON
    fresh = build_optimizer(model, name, 1e-3, 0.1, (0.9, 0.95))
    fresh.load_state_dict(unflatten_optimizer_state(tensors, json.loads(json.dumps(rest))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)


def test_rng_bytes_round_trip():
    state = torch.get_rng_state()
    assert torch.equal(decode_bytes(encode_bytes(state)), state)


def test_save_load_keep_and_leftovers(tmp_path):
    model, opt = trained()
    config = {"format": "custom-llm", "model": CONFIG.to_dict(), "train": {"lr": 1e-3}}
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, opt, {}, {"step": step}, config, keep=2)
    assert [p.name for p in list_complete(tmp_path)] == ["ckpt-4", "ckpt-6"]
    (tmp_path / ".ckpt-8.tmp-abcd").mkdir()  # an interrupted save
    (tmp_path / "ckpt-9").mkdir()  # a directory without the resume files is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "ckpt-6"
    ckpt = tmp_path / "ckpt-6"
    assert json.loads((ckpt / "config.json").read_text())["train"] == {"lr": 1e-3}
    assert load_trainer_state(ckpt) == {"step": 6}
    other = Transformer(CONFIG)
    load_weights(ckpt, other)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    fresh = build_optimizer(other, "adamw", 1e-3, 0.1, (0.9, 0.95))
    assert load_optimizer(ckpt, fresh) == {}
    assert len(fresh.state) == len(opt.state)
    save_checkpoint(tmp_path, 6, model, opt, {}, {"step": 7}, config, keep=2)  # re-saving a step replaces it
    assert load_trainer_state(ckpt) == {"step": 7}
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_non_finite_weights_are_never_written(tmp_path):
    model, opt = trained()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinity"):
        save_checkpoint(tmp_path, 1, model, opt, {}, {}, {"model": CONFIG.to_dict()})
    assert not list(tmp_path.iterdir())
