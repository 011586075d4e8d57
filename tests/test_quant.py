"""Weight-only int8 / int4 quantization: the math by hand, every kernel against the dequantize-then-matmul
reference, whole models against fp32, and the saved checkpoint through load_model and the CLI."""

import pytest
import torch

from custom_llm import ModelConfig, Transformer, load_model
from custom_llm.cli import main
from custom_llm.errors import UserError
from custom_llm.generation import Engine, generate_without_cache
from custom_llm.generation.quant import (QuantizedExperts, QuantizedLinear, choose_kernel, dequantize_int4,
                                         dequantize_int8, pack_int4, quantize_int4, quantize_int8, quantize_model,
                                         unpack_int4)
from custom_llm.generation.quant_io import save_quantized

CPU_KERNELS = [k for k in ("int8pack", "int4pack_cpu") if choose_kernel(k[:4], torch.device("cpu")) == k]


def tiny_config(**overrides):
    base = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def test_int8_by_hand():
    w = torch.tensor([[1.27, -0.635, 0.0, 0.01], [-2.54, 2.54, 1.0, -1.0]])
    q, scales = quantize_int8(w)
    torch.testing.assert_close(scales, torch.tensor([0.01, 0.02]))
    assert q.tolist() == [[127, -64, 0, 1], [-127, 127, 50, -50]]  # -63.5 rounds half to even: -64
    assert (dequantize_int8(q, scales) - w).abs().max() <= 0.01


def test_int4_by_hand_and_packing():
    w = torch.tensor([[0.0, 1.5, 0.75, 0.1, -1.0, 1.0, 0.0, 0.5]])  # groups of 4: [0, 1.5], [-1, 1]
    packed, scales, zeros = quantize_int4(w, 4)
    torch.testing.assert_close(scales, torch.tensor([[0.1, 2 / 15]]))
    torch.testing.assert_close(zeros, torch.tensor([[0.8, -1 + 16 / 15]]))
    assert unpack_int4(packed).tolist() == [[0, 15, 8, 1, 0, 15, 7, 11]]  # 7.4999: 7
    assert packed.tolist() == [[0x0F, 0x81, 0x0F, 0x7B]]  # even column high nibble, odd low
    deq = dequantize_int4(packed, scales, zeros)
    assert (deq - w).abs().max() <= (scales.max() / 2) + 1e-6


def test_pack_roundtrip():
    q = torch.randint(0, 16, (6, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.int32))


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantization_error_is_bounded(mode, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    layer = QuantizedLinear.from_weight(w, mode, group)
    err = (layer.dequantize() - w).abs()
    if mode == "int8":
        assert (err <= layer.scales[:, None] / 2 + 1e-6).all()
    else:
        assert (err.view(48, -1, group) <= layer.scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernels_match_the_reference(kernel, bias):
    """Each fast path against dequantize-then-matmul on the same (bf16-rounded) activations."""
    g = torch.Generator().manual_seed(2)
    mode = kernel[:4]
    w, b = torch.randn(96, 128, generator=g), torch.randn(96, generator=g) if bias else None
    fast = QuantizedLinear.from_weight(w, mode, 32, b)
    fast.pack(kernel)
    ref = QuantizedLinear.from_weight(w, mode, 32, b)
    ref.pack("reference")
    assert fast.kernel == kernel and ref.kernel == "reference"
    x = torch.randn(3, 5, 128, generator=g).bfloat16().float()  # (B, T, K)
    got, expected = fast(x), ref(x)
    # The kernels hold scales/zeros and outputs in bf16 (8 significant bits): about 0.4% each.
    assert (got - expected).norm() / expected.norm() < 1e-2
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_experts_match_float_experts_on_the_dequantized_weights(mode):
    from custom_llm.model.moe import Experts

    torch.manual_seed(3)
    experts = Experts(4, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    quant = QuantizedExperts.from_experts(experts, mode, 32)
    for layer in quant.modules():
        if isinstance(layer, QuantizedLinear):
            layer.pack("reference")
    with torch.no_grad():  # the float experts, holding exactly the dequantized weights
        experts.gate_up_proj.copy_(torch.stack([m.dequantize() for m in quant.gate_up_proj]))
        experts.down_proj.copy_(torch.stack([m.dequantize() for m in quant.down_proj]))
    x = torch.randn(10, 64)
    idx = torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2)
    counts = torch.bincount(idx.reshape(-1), minlength=4)
    torch.testing.assert_close(quant.forward_sorted(x, idx, weights, counts),
                               experts.forward_eager(x, idx, weights, counts), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_close_to_fp32_and_kernels_agree(moe, mode):
    extra = dict(n_experts=4, moe_top_k=2, moe_ffn_dim=64, n_shared_experts=1) if moe else {}
    torch.manual_seed(4)
    model = Transformer(tiny_config(**extra)).eval()
    ids = torch.randint(0, 96, (2, 12))
    fast = quantize_model(_copy(model), mode)
    ref = quantize_model(_copy(model), mode, kernel="reference")
    left = {name.split(".")[-1] for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    assert left <= {"router", "shared_expert_gate"}, left
    with torch.no_grad():
        expected, got_ref, got_fast = model(ids), ref(ids), fast(ids)
    rel = (got_ref - expected).norm() / expected.norm()
    assert rel < (0.02 if mode == "int8" else 0.2), rel
    torch.testing.assert_close(got_fast, got_ref, rtol=0.05, atol=0.05)


def _copy(model):
    clone = Transformer(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone.requires_grad_(False)


@pytest.mark.parametrize("tie,head", [(True, True), (True, False), (False, True)])
def test_save_and_load_model_roundtrip(tmp_path, tie, head):
    torch.manual_seed(5)
    model = quantize_model(Transformer(tiny_config(tie_embeddings=tie)).eval().requires_grad_(False), "int4", 32, head)
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == {"mode": "int4", "group_size": 32, "head": head}
    assert isinstance(loaded.lm_head, QuantizedLinear) == head
    if tie and not head:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_engine_decodes_a_quantized_model_like_the_reference_loop():
    torch.manual_seed(6)
    model = quantize_model(Transformer(tiny_config()).eval(), "int8")
    prompt = [3, 14, 15, 9, 2]
    assert Engine(model).generate([prompt], 12)[0] == generate_without_cache(model, prompt, 12)


def test_cli_quantize_then_generate(tmp_path, capsys):
    from custom_llm.tokenizers.char import CharTokenizer
    from custom_llm.checkpoint_io import save_model

    tokenizer = CharTokenizer.train(["hello world, the quick brown fox"])
    torch.manual_seed(7)
    save_model(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    assert main(["quantize", "--ckpt", str(tmp_path / "ckpt"), "--mode", "int4", "--out", str(tmp_path / "q")]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "q"), "--prompt", "he", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "he", "--max-new-tokens", "5",
                 "--temperature", "0", "--quantize", "int8"]) == 0
    capsys.readouterr()
    assert main(["quantize", "--ckpt", str(tmp_path / "q"), "--mode", "int8", "--out", str(tmp_path / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", "--ckpt", str(tmp_path / "ckpt"), "--mode", "int4", "--group-size", "128",
                 "--out", str(tmp_path / "q3")]) == 2
    assert "group size 128 does not divide" in capsys.readouterr().err


def _char_checkpoint(path, seed=7):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer.train(["hello world, the quick brown fox jumps over the lazy dog"])
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper logits than the init's: a quantization error shows in the loss
    save_model(model, path)
    tokenizer.save(path)
    return model, tokenizer


def test_quantize_on_load_for_eval_serve_and_the_harness(tmp_path, capsys):
    """--quantize reaches every command that loads a model for inference (one loader): eval's loss moves a
    little and by the same amount as quantizing by hand; the server's engine and the lm-eval model hold
    quantized layers; an already quantized checkpoint is refused."""
    import json

    from custom_llm.api import load_for_inference
    from custom_llm.generation.evaluate import evaluate_texts
    from custom_llm.generation.quant import QuantizedLinear
    from custom_llm.serving import load_served_model

    model, tokenizer = _char_checkpoint(tmp_path / "ckpt")
    text = tmp_path / "held_out.txt"
    text.write_text("the lazy dog jumps over the quick brown fox, hello world\n" * 3)
    losses = {}
    for mode in (None, "int8", "int4"):
        assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(text), "--json"]
                    + (["--quantize", mode] if mode else [])) == 0
        losses[mode] = json.loads(capsys.readouterr().out)["loss"]
    expected = evaluate_texts(quantize_model(_copy(model).eval(), "int4"), tokenizer, [text.read_text()],
                              start_id=tokenizer.eos_id, seq_len=64).loss
    assert losses["int4"] == pytest.approx(expected, rel=1e-5)
    assert losses["int8"] != losses[None] and losses["int4"] != losses[None]
    assert abs(losses["int8"] / losses[None] - 1) < 0.01 and abs(losses["int4"] / losses[None] - 1) < 0.05

    served = load_served_model(str(tmp_path / "ckpt"), device="cpu", quantize="int8", max_batch=2)
    assert any(isinstance(m, QuantizedLinear) for m in served.engine.model.modules())
    pytest.importorskip("lm_eval")
    from custom_llm.evaluation.harness import CustomLLM

    lm = CustomLLM(ckpt=str(tmp_path / "ckpt"), device="cpu", quantize="int4", group_size="32")
    assert lm.model.quantization["mode"] == "int4"

    assert main(["quantize", "--ckpt", str(tmp_path / "ckpt"), "--mode", "int8", "--out", str(tmp_path / "q")]) == 0
    with pytest.raises(UserError, match="already quantized"):
        load_for_inference(tmp_path / "q", "cpu", quantize="int4")
    assert main(["eval", "--ckpt", str(tmp_path / "q"), "--data", str(text), "--quantize", "int8"]) == 2
    assert "already quantized (int8); drop --quantize" in capsys.readouterr().err
