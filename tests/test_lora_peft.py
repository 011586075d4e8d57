"""LoRA adapters: frozen base, PEFT's on-disk format checked against PEFT itself on the exported model."""

from __future__ import annotations

import copy

import pytest
import torch

from custom_llm.config import ModelConfig
from custom_llm.errors import UserError
from custom_llm.interop import export_hf
from custom_llm.interop.peft import load_adapter, save_adapter
from custom_llm.model import Transformer
from custom_llm.model.lora import LoRAConfig, LoRALinear, adapter_state, apply_lora, merge_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(**overrides) -> Transformer:
    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


@torch.no_grad()
def _randomize(model):
    for p in adapter_state(model).values():
        p.add_(torch.randn_like(p) * 0.2)


def _hf(base, folder):
    export_hf(base, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def test_lora_freezes_the_base_starts_at_identity_and_trains_only_adapters():
    model = _tiny()
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    torch.testing.assert_close(model(ids), before)  # B = 0
    trainable = adapter_state(model)
    assert sorted({n.rsplit(".", 2)[0].split(".")[-1] for n in trainable}) == ["q_proj", "v_proj"]
    assert len(trainable) == 2 * 2 * 2  # layers x modules x (A, B)
    model.train()
    model.compute_loss(ids, ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None for p in trainable.values())
    with pytest.raises(ValueError, match="unknown"):
        LoRAConfig(targets=["embed"])


@pytest.mark.parametrize("overrides, targets, tokens", [
    (dict(), ["q_proj", "v_proj"], []),
    (dict(tie_embeddings=False), ALL, [62, 63]),
    (dict(), ALL, [62, 63]),
    (dict(rezero=True), ALL, []),
])
def test_our_adapter_runs_in_peft_on_the_exported_model(overrides, targets, tokens, tmp_path):
    base = _tiny(**overrides)
    if overrides.get("rezero"):
        with torch.no_grad():
            for block in base.layers:
                block.attn_scale.fill_(0.7)
                block.mlp_scale.fill_(1.3)
    hf = _hf(base, tmp_path / "hf")
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, targets=targets), tokens)
    _randomize(ours)
    save_adapter(ours, LoRAConfig(r=4, alpha=8, targets=targets), tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=2e-5, rtol=1e-4)
        # and back: the saved adapter loads into a fresh base with the same result
        again = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
        torch.testing.assert_close(again(ids), ours(ids))
        merged = merge_lora(again)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), ours(ids), atol=2e-5, rtol=1e-4)


def test_an_adapter_trained_with_peft_loads_here(tmp_path):
    base = _tiny(tie_embeddings=False)
    hf = _hf(base, tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                             task_type="CAUSAL_LM")
    trained = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    trained.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 64, (2, 12))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), trained.eval()(ids).logits, atol=2e-5, rtol=1e-4)


def test_mismatched_adapter_is_a_user_error(tmp_path):
    model = apply_lora(_tiny(), LoRAConfig(r=4, targets=["q_proj"]))
    save_adapter(model, LoRAConfig(r=4, targets=["q_proj"]), tmp_path)
    with pytest.raises(UserError, match="shape"):
        load_adapter(_tiny(d_model=64), tmp_path)


@pytest.mark.parametrize("layout, tied", [("wrapped", True), ("wrapped", False), ("peft-files", True)])
def test_lora_checkpoint_loads_merged_and_exports_merged_or_with_the_adapter(layout, tied, tmp_path):
    """Fine-tuning saves the wrapped model (base, adapters, their scale, trained rows); a base checkpoint
    with PEFT's two files beside it works too."""
    from custom_llm.api import load_model
    from custom_llm.checkpoint_io import model_state_for_saving, save_model
    from custom_llm.interop.peft import export_lora_checkpoint
    from custom_llm.model.lora import base_state_dict

    base = _tiny(tie_embeddings=tied)
    rows = [60, 63] if layout == "wrapped" else []
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, targets=ALL), rows)
    _randomize(ours)
    ckpt = tmp_path / "ckpt"
    if layout == "wrapped":
        save_model(ours, ckpt)
    else:
        save_model(base, ckpt)
        save_adapter(ours, LoRAConfig(r=4, alpha=8, targets=ALL), ckpt)
    assert set(base_state_dict(ours)) - ({"lm_head.weight"} if tied else set()) == set(model_state_for_saving(base))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(load_model(ckpt)(ids), expected, atol=2e-5, rtol=1e-4)
    export_lora_checkpoint(ckpt, tmp_path / "merged", merge=True)
    export_lora_checkpoint(ckpt, tmp_path / "split", merge=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    split = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split"), tmp_path / "split" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(split(ids).logits, expected, atol=2e-5, rtol=1e-4)
