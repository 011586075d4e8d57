"""Tokenizers: byte-level BPE (HF-compatible files, exact round trips, bounded time) and the char fallback."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custom_llm.errors import UserError
from custom_llm.tokenizers import (SPECIAL_TOKENS, BPETokenizer, CharTokenizer, load_tokenizer, resolve_kind,
                                   train_tokenizer)

SAMPLES = ["Hello, world!", "  indented\n\tcode()  \n\n", "héllo wörld", "emoji 🤗🎉 and 👨‍👩‍👧", "中文字符测试",
           "control \x00\x01\x1b[0m chars", "<|eos|> is text here", "", " ", "a" * 300, "1234567890" * 30]


def _corpus(n_words: int = 20000, seed: int = 0) -> list[str]:
    """Seeded pseudo-words plus some Unicode, enough pairs for a few hundred merges."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "de", "lo", "pa", "qui", "zor", "é", "ß", "中", "文", "🤗"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return ["\n".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_tokenizer(_corpus(), kind="bpe", vocab_size=600)


def test_bpe_vocab_rounded_to_multiple_of_64_with_special_tokens_first(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 640
    assert [bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id] == [0, 1, 2, 3]
    assert [bpe.hf.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert len(bpe.encode("kasentoquizor")) < len("kasentoquizor")  # merges were learned


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_samples(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_special_token_text_is_encoded_as_text(bpe):
    ids = bpe.encode("<|eos|><|bos|>")
    assert bpe.eos_id not in ids and bpe.bos_id not in ids
    assert bpe.decode([bpe.bos_id, *bpe.encode("hi"), bpe.eos_id]) == "hi"
    assert bpe.decode([bpe.eos_id], skip_special_tokens=False) == "<|eos|>"


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_string(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_incremental_decoder_matches_decode_and_never_breaks_characters(bpe, text):
    ids = bpe.encode(text)
    dec = bpe.incremental_decoder()
    parts = [dec.push(i) for i in ids]
    assert "\ufffd" not in "".join(parts) or "\ufffd" in text
    assert "".join(parts) + dec.flush() == bpe.decode(ids) == text


def test_incremental_decoder_holds_back_split_characters(bpe):
    text = "🤗中文🎉"
    ids = bpe.encode(text)
    # the test is only meaningful if some token ends inside a multi-byte character
    assert any(_not_utf8(bpe.token_bytes(i)) for i in ids)
    dec = bpe.incremental_decoder()
    parts = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + dec.flush() == text


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_incremental_decoder_on_arbitrary_ids_matches_decode(bpe):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 12))]
        dec = bpe.incremental_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == bpe.decode(ids)


def test_one_megabyte_line_without_spaces_is_fast_and_exact(bpe):
    rng = random.Random(0)
    line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1 << 20))
    start = time.perf_counter()
    ids = bpe.encode(line)
    assert time.perf_counter() - start < 20.0
    assert bpe.decode(ids) == line


def test_bpe_training_is_deterministic():
    a = train_tokenizer(_corpus(3000), kind="bpe", vocab_size=320)
    b = train_tokenizer(_corpus(3000), kind="bpe", vocab_size=320)
    assert a.fingerprint() == b.fingerprint()


def test_bpe_too_small_vocab_is_a_user_error():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["abc"], kind="bpe", vocab_size=64)


def test_saved_bpe_loads_here_in_tokenizers_and_in_transformers(bpe, tmp_path):
    import tokenizers

    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert again.fingerprint() == bpe.fingerprint() and again.special_ids() == bpe.special_ids()
    raw = tokenizers.Tokenizer.from_file(str(path))
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES[:-3]:
        ids = bpe.encode(text)
        assert raw.encode(text.replace("<|eos|>", "")).ids == bpe.encode(text.replace("<|eos|>", ""))
        assert fast.encode(text.replace("<|eos|>", ""), add_special_tokens=False) == bpe.encode(
            text.replace("<|eos|>", ""))
        assert fast.decode(ids) == raw.decode(ids) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        resolve_kind("wordpiece")


def test_char_tokenizer_round_trip_unknowns_and_file(tmp_path):
    tok = train_tokenizer(["hello world", "héllo 🤗"], kind="char")
    assert isinstance(tok, CharTokenizer) and tok.kind == "char"
    assert tok.vocab_size == 4 + len(set("hello worldé🤗"))
    assert tok.decode(tok.encode("hello 🤗")) == "hello 🤗"
    assert tok.encode("hz") == [tok.encode("h")[0], tok.unk_id]
    assert tok.decode(tok.encode("hz"), skip_special_tokens=False) == "h<|unk|>"
    path = tok.save(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8"))["type"] == "char"
    again = load_tokenizer(path)
    assert again.encode("héllo 🤗") == tok.encode("héllo 🤗") and again.fingerprint() == tok.fingerprint()
    dec = again.incremental_decoder()
    assert "".join(dec.push(i) for i in tok.encode("héllo 🤗")) + dec.flush() == "héllo 🤗"


def test_char_fallback_when_tokenizers_is_unimportable(tmp_path):
    script = textwrap.dedent(f"""
        import logging, sys
        sys.modules["tokenizers"] = None  # makes `import tokenizers` raise ImportError
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from custom_llm.errors import UserError
        from custom_llm.tokenizers import load_tokenizer, train_tokenizer
        from custom_llm.data import BatchLoader, prepare_data
        tok = train_tokenizer(["abc", "cab"], kind="auto")
        assert tok.kind == "char" and tok.decode(tok.encode("abc")) == "abc"
        tok.save(r"{tmp_path}")
        assert load_tokenizer(r"{tmp_path}").encode("cab") == tok.encode("cab")
        try:
            train_tokenizer(["abc"], kind="bpe")
        except UserError as exc:
            print("bpe error:", exc)
        open(r"{tmp_path / 'c.txt'}", "w").write("some text " * 50)
        tok, ds = prepare_data([r"{tmp_path / 'c.txt'}"], cache_dir=r"{tmp_path / 'cache'}", min_tokens=9)
        x, y = BatchLoader(ds.train, 2, 8).next_batch()
        print("ok", tok.kind, len(ds.train), tuple(x.shape))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok char" in out.stdout and "(2, 8)" in out.stdout
    assert "bpe error: the 'tokenizers' package is not installed" in out.stdout
    notices = [line for line in out.stderr.splitlines() if "character tokenizer" in line]
    assert len(notices) == 2  # one line per kind="auto" training


def test_foreign_sentencepiece_style_file_streams_without_broken_characters(tmp_path):
    """An HF file that is not byte-level (Metaspace + byte fallback) uses the prefix-diff decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator(_corpus(2000), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]
                                                              + byte_tokens, show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, -1)
    text = "kato 🙂 rimu\nzor 中文 ✓"
    ids = tok.encode(text)
    assert any(hf.id_to_token(i).startswith("<0x") for i in ids)  # some characters were split into bytes
    dec = tok.incremental_decoder()
    parts = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + dec.flush() == tok.decode(ids)
