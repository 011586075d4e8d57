"""Our GGUF files in llama.cpp itself (llama-cpp-python, built by scripts/check_gguf.sh): the same token ids,
next-token logits within a stated tolerance, the same greedy continuation."""

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/check_gguf.sh builds it)")
pytest.importorskip("gguf", reason="the gguf package is not installed")

from custom_llm import ModelConfig, Transformer  # noqa: E402
from custom_llm.interop.gguf import export_gguf  # noqa: E402

pytestmark = pytest.mark.slow

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world! It's 2024, isn't it?\n  Indented line.",
         "def f(x):\n    return x + 1  # comment\n\n\n", "numbers 12345 and symbols ->=<!! done", "   leading spaces"]
# f16 weights against our fp32 forward: logits agree to about 1e-3 of their spread.
F16_TOLERANCE = 2e-2
Q8_TOLERANCE = 1e-1


@pytest.fixture(scope="module")
def bpe():
    from custom_llm.tokenizers.bpe import BPETokenizer

    return BPETokenizer.train(TEXTS * 30, vocab_size=300)


def _model(seed, **kw):
    base = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # larger weights than the init: attention and MLP matter, greedy is decided
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return model


def _llama(path, vocab):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                           n_batch=128, seed=0)


def _their_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def test_same_token_ids(tmp_path, bpe):
    llm = _llama(export_gguf(_model(0), tmp_path / "m.gguf", tokenizer=bpe), 384)
    for text in TEXTS + ["<|eos|> is text here", "ünïcödé and emoji 🙂"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == bpe.encode(text), text


@pytest.mark.parametrize("kind,quant", [("dense", "f16"), ("dense", "q8_0"), ("moe", "f16")])
def test_logits_and_greedy_continuation(tmp_path, bpe, kind, quant):
    kw = dict(n_experts=4, moe_top_k=2, moe_ffn_dim=64) if kind == "moe" else {}
    model = _model(1, **kw)
    llm = _llama(export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe, quant=quant), 384)
    ids = [bpe.eos_id] + bpe.encode("The quick brown fox")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = _their_logits(llm, ids)
    spread = ours.max() - ours.min()
    tol = F16_TOLERANCE if quant == "f16" else Q8_TOLERANCE
    assert np.abs(theirs - ours).max() < tol * spread, (np.abs(theirs - ours).max(), spread)
    from custom_llm.generation import generate_without_cache

    greedy = generate_without_cache(model, ids, 12)
    if quant == "f16":  # teacher-forced: llama.cpp's argmax after each prefix is our next greedy token
        scores = _their_logits(llm, ids + greedy)
        assert [int(i) for i in scores[len(ids) - 1: len(ids) + 11].argmax(-1)] == greedy


def test_char_tokenizer_in_llama_cpp(tmp_path):
    from custom_llm.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(["hello world, the quick brown fox! 123\n"])
    llm = _llama(export_gguf(_model(2, vocab_size=64), tmp_path / "c.gguf", tokenizer=tok), 64)
    text = "the quick, brown world!\n 12"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
