"""ModelConfig validation, serialization and presets."""

import json

import pytest
import torch

from custom_llm import ConfigError, ModelConfig, Transformer, model_preset
from custom_llm.config import MODEL_PRESETS, field_docs, from_dict, load_config_file


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads (6) must be divisible by n_kv_heads (4)"),
    (dict(d_model=30, n_heads=4, n_kv_heads=2, head_dim=7), "head_dim (7) must be even"),
    (dict(sliding_window=512, max_seq_len=256), "sliding_window (512) must not exceed max_seq_len (256)"),
    (dict(attn_backend="flash"), "attn_backend must be one of"),
    (dict(layerdrop=1.0), "layerdrop must be in [0, 1)"),
    (dict(layerdrop=-0.1), "layerdrop must be in [0, 1)"),
    (dict(window_pattern="SXL", sliding_window=8), "window_pattern must be"),
    (dict(n_experts=4, moe_top_k=5), "moe_top_k must be between 1 and n_experts"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(attn_backend="flex", dropout=0.1), "flex"),
])
def test_invalid_values_name_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    assert fragment in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        ModelConfig(attn_backend="nope", layerdrop=2.0, dropout=-1.0)
    message = str(info.value)
    assert "attn_backend" in message and "layerdrop" in message and "dropout" in message


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"d_model": "wide", "n_layerz": 3, "rezero": "yes"})
    message = str(info.value)
    assert "unknown key 'n_layerz'" in message
    assert "d_model must be an integer" in message
    assert "rezero must be true or false" in message


def test_json_and_yaml_round_trip(tmp_path):
    config = ModelConfig(d_model=64, n_heads=4, n_kv_heads=1, sliding_window=16, window_pattern="SSL",
                         n_experts=4, moe_top_k=1, rezero=True, norm_eps=1e-6)
    as_json = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(as_json) == config
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": config.to_dict()}))
    assert ModelConfig.from_dict(load_config_file(path)["model"]) == config


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    docs = field_docs(ModelConfig)
    missing = [f for f in ModelConfig.__dataclass_fields__ if f not in docs]
    assert not missing


@pytest.mark.parametrize("name,low,high", [("tiny", 0.5e6, 5e6), ("small", 20e6, 32e6), ("base", 110e6, 140e6)])
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        model = Transformer(model_preset(name))
    total = model.num_params()["total"]
    assert low <= total <= high, f"{name}: {total / 1e6:.1f}M"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        model_preset("huge")
    assert set(MODEL_PRESETS) >= {"tiny", "small", "base", "moe-small"}


def test_defaults_derive_sizes():
    config = ModelConfig(d_model=384, n_heads=6)
    assert config.resolved_head_dim == 64
    assert config.resolved_ffn_dim == 1024  # 8/3 * 384 = 1024, a multiple of 64
    assert ModelConfig(d_model=104, n_heads=4).resolved_ffn_dim == 320  # 277 rounded up to 64s
