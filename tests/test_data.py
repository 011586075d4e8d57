"""Data pipeline: sources and their errors, the split, cached token files, seeded batches."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from custom_llm.data import (BatchLoader, Document, build_token_dataset, default_corpus_files, default_corpus_root,
                             load_documents,
                             prepare_data, sequential_batches, split_documents, token_dtype, unigram_entropy)
from custom_llm.data.tokens import split_at_lines
from custom_llm.errors import UserError
from custom_llm.tokenizers import train_tokenizer

PY_SOURCE = Path(json.__file__).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer([PY_SOURCE, Path(logging.__file__).read_text(encoding="utf-8")], kind="bpe",
                           vocab_size=512)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- sources -------------------------------------------------------------------------------------------

def test_directory_is_recursive_sorted_filtered_and_skips_hidden(tmp_path):
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a" / "z.md", "zed")
    _write(tmp_path / "a" / "y.py", "why")
    _write(tmp_path / ".git" / "x.txt", "hidden")
    _write(tmp_path / ".hidden.txt", "hidden")
    docs = load_documents([str(tmp_path)])
    assert [d.text for d in docs] == ["why", "zed", "bee"]
    assert [d.text for d in load_documents([str(tmp_path)], extensions="md,txt")] == ["zed", "bee"]
    assert [d.text for d in load_documents([str(tmp_path / "**" / "*.md")])] == ["zed"]


def test_jsonl_text_field_and_its_errors(tmp_path):
    good = _write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert [d.text for d in load_documents([str(good)])] == ["one", "two"]
    other = _write(tmp_path / "o.jsonl", '{"body": "x"}\n')
    assert [d.text for d in load_documents([str(other)], text_field="body")] == ["x"]
    with pytest.raises(UserError, match=r"o\.jsonl:1: no 'text' field"):
        load_documents([str(other)])
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        load_documents([str(bad)])


def test_missing_empty_and_binary_sources(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.txt"):
        load_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="no files match"):
        load_documents([str(tmp_path / "*.none")])
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty corpus"):
        load_documents([str(empty)])
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\x00\x00\x01" * 10)
    with pytest.raises(UserError, match="blob.bin looks like a binary file"):
        load_documents([str(binary)])
    _write(tmp_path / "ok.txt", "text")
    assert [d.text for d in load_documents([str(tmp_path)])] == ["text"]  # binary skipped in a directory


def test_invalid_utf8_is_replaced_with_a_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "latin.txt"
    path.write_bytes("café".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        docs = load_documents([str(path)])
    assert docs[0].text == "caf\ufffd"
    assert [r.getMessage() for r in caplog.records if "latin.txt" in r.getMessage()][0].count("\n") == 0


def test_hf_dataset_source_from_a_local_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in load_documents([f"hf:{tmp_path / 'ds'}"])] == ["alpha", "beta"]


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="needs the 'datasets' package"):
        load_documents(["hf:wikitext"])


def test_default_corpus_is_the_sorted_stdlib_sources():
    root = default_corpus_root()
    files = default_corpus_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)


# --- split ---------------------------------------------------------------------------------------------

def test_split_is_by_name_hash_not_order():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(docs[::-1], 0.1)
    assert {d.name for d in val} == {d.name for d in val2} and 5 <= len(val) <= 40
    assert len(train) + len(val) == 200
    assert split_documents(docs[:2], 0.05)[1]  # never an empty validation split with 2+ documents


def test_single_document_splits_at_a_line_near_the_tail():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("one", text)], 0.1)
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line 9") and train[0].text.endswith("\n")


# --- token files ---------------------------------------------------------------------------------------

def _reference_tokens(docs, tok):
    out = []
    for d in docs:
        out += tok.encode(d.text) + [tok.eos_id]
    return np.array(out)


def test_token_files_match_naive_encoding_and_are_reused(tmp_path, bpe, monkeypatch):
    docs = [Document(f"d{i}", PY_SOURCE[i * 500:(i + 1) * 500]) for i in range(20)]
    ds = build_token_dataset(docs[:15], docs[15:], bpe, tmp_path)
    assert ds.train.dtype == np.uint16 and ds.meta["train_tokens"] == len(ds.train)
    np.testing.assert_array_equal(ds.train, _reference_tokens(docs[:15], bpe))
    np.testing.assert_array_equal(ds.val, _reference_tokens(docs[15:], bpe))

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded although the cache is valid")

    monkeypatch.setattr(bpe, "encode_batch", fail)
    again = build_token_dataset(docs[:15], docs[15:], bpe, tmp_path)
    np.testing.assert_array_equal(again.train, ds.train)
    with pytest.raises(AssertionError, match="re-encoded"):  # a changed corpus is a new cache entry
        build_token_dataset(docs[:14], docs[15:], bpe, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_cache_is_rebuilt(tmp_path, bpe, damage, caplog):
    docs = [Document("a", PY_SOURCE[:3000]), Document("b", PY_SOURCE[3000:4000])]
    ds = build_token_dataset(docs[:1], docs[1:], bpe, tmp_path)
    expected = np.array(ds.train)
    key = ds.meta["key"]
    train_bin, header = tmp_path / "tokens" / f"{key}.train.bin", tmp_path / "tokens" / f"{key}.json"
    del ds
    if damage == "truncate":
        train_bin.write_bytes(train_bin.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(train_bin.read_bytes())
        data[5] ^= 0xFF
        train_bin.write_bytes(bytes(data))
    else:
        header.write_text(header.read_text()[:20])
    with caplog.at_level(logging.WARNING):
        rebuilt = build_token_dataset(docs[:1], docs[1:], bpe, tmp_path)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(rebuilt.train, expected)


def test_failure_while_tokenizing_leaves_nothing_behind(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr("custom_llm.data.tokens.ENCODE_CHUNK_CHARS", 10)
    calls = []

    def flaky(texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [bpe.encode(t) for t in texts]

    monkeypatch.setattr(bpe, "encode_batch", flaky)
    docs = [Document(f"d{i}", f"text number {i}") for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        build_token_dataset(docs, [], bpe, tmp_path)
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == []


def test_long_documents_are_encoded_in_exact_pieces(bpe):
    pieces = split_at_lines(PY_SOURCE, size=1000)
    assert len(pieces) > 5 and "".join(pieces) == PY_SOURCE
    assert sum((bpe.encode(p) for p in pieces), []) == bpe.encode(PY_SOURCE)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_data_caches_the_tokenizer_and_checks_min_tokens(tmp_path, monkeypatch):
    corpus = _write(tmp_path / "corpus" / "a.txt", PY_SOURCE[:20000])
    _write(tmp_path / "corpus" / "b.txt", PY_SOURCE[20000:24000])
    cache = tmp_path / "cache"
    tok, ds = prepare_data([str(corpus.parent)], vocab_size=320, cache_dir=cache, min_tokens=64)
    assert tok.kind == "bpe" and len(ds.train) > 64 and len(ds.val) > 0
    monkeypatch.setattr("custom_llm.data.prepare.train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    tok2, ds2 = prepare_data([str(corpus.parent)], vocab_size=320, cache_dir=cache)
    assert tok2.fingerprint() == tok.fingerprint() and ds2.meta["key"] == ds.meta["key"]
    with pytest.raises(UserError, match=r"corpus.* training tokens, fewer than one context window \(1000000"):
        prepare_data([str(corpus.parent)], vocab_size=320, cache_dir=cache, min_tokens=1_000_000)


def test_user_error_writes_nothing_to_the_cache(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"title": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        prepare_data([str(bad)], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- batches -------------------------------------------------------------------------------------------

def test_batches_are_shifted_windows_of_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = BatchLoader(tokens, batch_size=4, seq_len=16, seed=3)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
        np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
        np.testing.assert_array_equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
        assert int(y.max()) <= 999
    edge = BatchLoader(np.arange(9), batch_size=2, seq_len=8)  # exactly one window fits
    np.testing.assert_array_equal(edge.next_batch()[0], np.tile(np.arange(8), (2, 1)))
    with pytest.raises(UserError, match="cannot fill one window"):
        BatchLoader(np.arange(8), batch_size=2, seq_len=8)


def test_state_restores_the_exact_next_batches():
    tokens = np.arange(5000, dtype=np.uint32)
    loader = BatchLoader(tokens, 4, 32, seed=7)
    for _ in range(3):
        loader.next_batch()
    loader.set_shape(2, 64)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch()[0] for _ in range(4)]
    resumed = BatchLoader(tokens, 4, 32, seed=7)
    resumed.load_state_dict(state)
    for batch in expected:
        np.testing.assert_array_equal(resumed.next_batch()[0], batch)
    fresh = BatchLoader(tokens, 4, 32, seed=7)
    assert not np.array_equal(fresh.next_batch()[0][:, :8], expected[0][:, :8])
    with pytest.raises(UserError, match="data changed"):
        BatchLoader(tokens[:4000], 4, 32).load_state_dict(state)


def test_ranks_draw_different_windows_that_together_form_the_single_process_batch():
    tokens = np.arange(100_000, dtype=np.uint32)
    plain = BatchLoader(tokens, 8, 16, seed=1)
    single = BatchLoader(tokens, 8, 16, seed=1, rank=0, world_size=1)
    ranks = [BatchLoader(tokens, 4, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = plain.next_batch()[0]
        np.testing.assert_array_equal(single.next_batch()[0], full)
        parts = [r.next_batch()[0] for r in ranks]
        assert not np.array_equal(parts[0], parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), full)


def test_set_shape_is_deterministic():
    tokens = np.arange(10_000)
    a, b = BatchLoader(tokens, 2, 8, seed=5), BatchLoader(tokens, 2, 8, seed=5)
    for loader in (a, b):
        loader.next_batch()
        loader.set_shape(3, 20)
    xa, xb = a.next_batch()[0], b.next_batch()[0]
    assert xa.shape == (3, 20)
    np.testing.assert_array_equal(xa, xb)


def test_sequential_batches_cover_the_stream_once_per_rank_split():
    tokens = np.arange(101)
    seen = [x for r in range(2) for x, _ in sequential_batches(tokens, 2, 10, rank=r, world_size=2)]
    starts = sorted(int(row[0]) for x in seen for row in x)
    assert starts == list(range(0, 100, 10))


def test_unigram_entropy_by_hand():
    assert unigram_entropy(np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([3, 3, 3])) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(np.array([0, 0, 1, 2])) == pytest.approx(-(p * np.log(p)).sum())


def test_document_names_do_not_depend_on_where_the_corpus_lies(tmp_path, monkeypatch):
    for base in ("one", "two/deeper"):
        _write(tmp_path / base / "corpus" / "sub" / "a.txt", "alpha")
        _write(tmp_path / base / "single.txt", "beta")
    names = [[d.name for d in load_documents([str(tmp_path / base / "corpus"), str(tmp_path / base / "single.txt")])]
             for base in ("one", "two/deeper")]
    assert names[0] == names[1] == ["corpus/sub/a.txt", "single.txt"]
    monkeypatch.chdir(tmp_path / "one")
    assert [d.name for d in load_documents(["corpus"])] == ["corpus/sub/a.txt"]


def test_state_from_one_world_size_resumes_the_same_global_stream_under_another():
    tokens = np.arange(50_000, dtype=np.uint32)
    single = BatchLoader(tokens, 8, 16, seed=2)
    single.next_batch()
    state = single.state_dict()
    expected = single.next_batch()[0]
    ranks = [BatchLoader(tokens, 1, 16, rank=r, world_size=4) for r in range(4)]
    for r in ranks:
        r.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([r.next_batch()[0] for r in ranks]), expected)
    with pytest.raises(UserError, match="does not split over 3 ranks"):
        BatchLoader(tokens, 1, 16, world_size=3).load_state_dict(state)


def test_hf_source_column_handling_with_a_stand_in_datasets_module(monkeypatch):
    """Our side of hf:NAME:CONFIG (argument passing, column checks) without the real package."""
    import sys
    import types

    calls = []

    class FakeDataset:
        column_names = ["content", "id"]

        def __getitem__(self, column):
            return {"content": ["first", None, "third"], "id": [1, 2, 3]}[column]

    fake = types.ModuleType("datasets")
    fake.DatasetDict = dict
    fake.load_dataset = lambda name, config, split: calls.append((name, config, split)) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_documents(["hf:some/name:cfg"], text_field="content")
    assert [d.text for d in docs] == ["first", "third"] and calls == [("some/name", "cfg", "train")]
    with pytest.raises(UserError, match=r"hf:some/name: no 'text' column \(columns: content, id\)"):
        load_documents(["hf:some/name"])
