"""Config mapping to and from Hugging Face: mapped fields survive a round trip; unrepresentable
features are refused by name; bad folders fail with one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from custom_llm import ModelConfig, Transformer, UserError
from custom_llm.checkpoint_io import save_model
from custom_llm.cli import main
from custom_llm.interop import export_hf, hf_config_to_model_config, model_config_to_hf_config

SIZES = dict(vocab_size=80, d_model=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=112, max_seq_len=512)
ROUND_TRIP = {
    "llama": dict(head_dim=16, tie_embeddings=False, norm_eps=1e-5, rope_theta=5e5, attn_bias=True, init_std=0.01),
    "mistral": dict(n_kv_heads=1, sliding_window=128, tie_embeddings=True, norm_eps=3e-6, rope_theta=1e6),
    "mixtral": dict(n_experts=8, moe_top_k=3, moe_ffn_dim=96, sliding_window=64, n_kv_heads=4),
    "qwen2_moe": dict(n_layers=5, n_experts=6, moe_top_k=2, moe_ffn_dim=40, moe_renormalize=True, n_shared_experts=1,
                      shared_expert_ffn_dim=80, shared_expert_gate=True, moe_first_dense=1, moe_every=2,
                      sliding_window=32, window_pattern="SSL", attn_bias=False, rope_theta=2e4),
}


def _mapped(config: ModelConfig, model_type: str) -> dict:
    """Every field that has a Hugging Face counterpart, as resolved values."""
    fields = dict(vocab=config.vocab_size, d_model=config.d_model, layers=config.n_layers, heads=config.n_heads,
                  kv_heads=config.n_kv_heads, head_dim=config.resolved_head_dim, max_seq_len=config.max_seq_len,
                  tied=config.tie_embeddings, eps=config.norm_eps, theta=config.rope_theta, bias=config.attn_bias,
                  windows=config.layer_windows(), moe_layers=config.layer_is_moe(), init_std=config.init_std)
    if model_type != "mixtral":  # Mixtral has no dense feed-forward
        fields["ffn_dim"] = config.resolved_ffn_dim
    if config.n_experts:
        fields.update(experts=config.n_experts, top_k=config.moe_top_k, moe_ffn=config.resolved_moe_ffn_dim,
                      renormalize=config.moe_renormalize, shared_ffn=config.resolved_shared_ffn_dim,
                      shared_gate=config.shared_expert_gate and config.n_shared_experts > 0)
    return fields


@pytest.mark.parametrize("model_type", list(ROUND_TRIP))
def test_mapped_fields_survive_round_trip(model_type):
    config = ModelConfig(**{**SIZES, **ROUND_TRIP[model_type]})
    hf = model_config_to_hf_config(config)
    assert hf["model_type"] == model_type
    back = hf_config_to_model_config(json.loads(json.dumps(hf)))
    assert _mapped(back, model_type) == _mapped(config, model_type)


@pytest.mark.parametrize("model_type", list(ROUND_TRIP))
def test_transformers_reads_our_config_the_same_way(model_type):
    """Through transformers' own config class (defaults, derived fields, serialisation) and back."""
    transformers = pytest.importorskip("transformers")
    config = ModelConfig(**{**SIZES, **ROUND_TRIP[model_type]})
    hf = model_config_to_hf_config(config)
    hf_config = transformers.AutoConfig.for_model(**hf)
    assert _mapped(hf_config_to_model_config(hf_config.to_dict()), model_type) == _mapped(config, model_type)


REFUSED = [
    (dict(sliding_window=16, window_pattern="SL"), "window_pattern"),
    (dict(sliding_window=16, attn_bias=True), "attn_bias"),
    (dict(d_model=60, n_heads=8, head_dim=8, n_kv_heads=2), "head_dim"),
    (dict(n_experts=4, moe_first_dense=1), "moe_first_dense"),
    (dict(n_experts=4, moe_every=2), "moe_every"),
    (dict(n_experts=4, moe_renormalize=False), "moe_renormalize"),
    (dict(n_experts=4, attn_bias=True), "attn_bias"),
    (dict(n_experts=4, sliding_window=16, window_pattern="SL"), "window_pattern"),
    (dict(n_experts=4, n_shared_experts=1), "shared_expert_gate"),
    (dict(n_experts=4, n_shared_experts=1, shared_expert_gate=True, head_dim=16), "head_dim"),
]


@pytest.mark.parametrize("fields,feature", REFUSED)
def test_unrepresentable_features_are_refused_by_name(fields, feature):
    config = ModelConfig(**{**SIZES, "moe_ffn_dim": 32, **fields})
    with pytest.raises(UserError, match=feature):
        model_config_to_hf_config(config)


def test_training_only_features_do_not_block_export():
    config = ModelConfig(**SIZES, rezero=True, layerdrop=0.3, dropout=0.1, grad_checkpointing=True, n_experts=4,
                         moe_noisy_gating=True, moe_ffn_dim=32)
    assert model_config_to_hf_config(config)["model_type"] == "mixtral"


# --- command line: bad input --------------------------------------------------------------------------------

TINY = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


@pytest.fixture
def hf_folder(tmp_path):
    """A small Llama folder written by our exporter (no transformers needed)."""
    torch.manual_seed(0)
    return export_hf(Transformer(ModelConfig(**TINY)), tmp_path / "hf")


def _fails(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _rewrite_weights(folder, change):
    from safetensors.torch import load_file, save_file

    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_import_unsupported_architecture_lists_supported(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _fails(["import", "--hf", str(folder), "--out", str(tmp_path / "ckpt")], capsys, "GPT2LMHeadModel",
           "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM")
    assert not (tmp_path / "ckpt").exists()


def test_import_missing_tensor_is_named(hf_folder, tmp_path, capsys):
    _rewrite_weights(hf_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _fails(["import", "--hf", str(hf_folder), "--out", str(tmp_path / "ckpt")], capsys,
           "missing tensor model.layers.1.mlp.up_proj.weight", "(48, 32)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, no temporary left over


def test_import_mismatched_tensor_names_both_shapes(hf_folder, tmp_path, capsys):
    def change(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)

    _rewrite_weights(hf_folder, change)
    _fails(["import", "--hf", str(hf_folder), "--out", str(tmp_path / "ckpt")], capsys,
           "model.layers.0.self_attn.k_proj.weight", "(32, 32)", "(16, 32)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_import_unexpected_tensor_and_missing_folder(hf_folder, tmp_path, capsys):
    _rewrite_weights(hf_folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    _fails(["import", "--hf", str(hf_folder), "--out", str(tmp_path / "ckpt")], capsys, "model.layers.0.mlp.extra.weight")
    _fails(["import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ckpt")], capsys, "nowhere")
    assert not (tmp_path / "ckpt").exists()


def test_export_refusal_and_occupied_output(tmp_path, capsys):
    config = ModelConfig(**TINY, n_experts=4, moe_ffn_dim=16, n_shared_experts=1)  # ungated shared expert
    save_model(Transformer(config), tmp_path / "ckpt")
    _fails(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")], capsys, "shared_expert_gate")
    assert not (tmp_path / "hf").exists()
    save_model(Transformer(ModelConfig(**TINY)), tmp_path / "dense")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    _fails(["export", "--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "busy")], capsys, "not empty")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


def test_export_import_round_trip_keeps_weights(hf_folder, tmp_path):
    assert main(["import", "--hf", str(hf_folder), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "again"), "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file

    first, second = load_file(str(hf_folder / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert second[name].dtype == torch.bfloat16
        torch.testing.assert_close(second[name].float(), tensor.to(torch.bfloat16).float(), atol=0, rtol=0)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"


def test_import_refuses_nonzero_llama_o_proj_bias(tmp_path, capsys):
    """HF Llama's attention_bias also biases o_proj; we import it only when that bias is zero."""
    folder = export_hf(Transformer(ModelConfig(**TINY, attn_bias=True)), tmp_path / "hf")
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "ok")]) == 0
    _rewrite_weights(folder, lambda t: t["model.layers.0.self_attn.o_proj.bias"].fill_(0.5))
    _fails(["import", "--hf", str(folder), "--out", str(tmp_path / "ckpt")], capsys, "o_proj.bias")
