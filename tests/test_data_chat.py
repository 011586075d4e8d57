"""Conversation data for fine-tuning: validation with line numbers, template loss masks, packing, batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from custom_llm.data.chat import (IGNORE_INDEX, PAD_DOCUMENT, ChatBatches, build_rows, check_conversation,
                                  default_conversations, pack, tokenize_conversations)
from custom_llm.errors import UserError
from custom_llm.tokenizers import IM_END, IM_START, train_tokenizer

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!'`()_:=+\n0123456789"


def _turns(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


@pytest.fixture(scope="module")
def char():
    return train_tokenizer([TEXT], kind="char").with_chat_tokens()


@pytest.mark.parametrize("messages, reason", [
    (_turns(("hi", "hello")), None),
    (_turns(("hi", "hello"), ("more", "sure"), system="be kind"), None),
    ([], "empty conversation"),
    ("hi", "no 'messages' list"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "empty message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "not alternating"),
    ([{"role": "assistant", "content": "a"}], "not alternating"),
    ([{"role": "user", "content": "a"}], "not alternating"),  # nothing to learn
    (_turns(("a", "b")) + [{"role": "system", "content": "late"}], "not alternating"),
])
def test_check_conversation(messages, reason):
    assert check_conversation(messages) == reason


def test_invalid_lines_are_counted_with_line_numbers(char, tmp_path, caplog):
    lines = [json.dumps({"messages": _turns(("hi", "hello"))}),  # 1 ok
             "{not json",  # 2
             "",  # blank: skipped, not counted
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}),  # 4
             json.dumps({"messages": _turns(("long " * 40, "answer"))}),  # 5 too long
             json.dumps({"messages": _turns(("q", "a"), system="s")})]  # 6 ok
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chats, report = tokenize_conversations(str(path), char, max_len=120)
    assert [c.line for c in chats] == [1, 6] and (report.total, report.valid) == (5, 2)
    assert report.invalid == {"not JSON with a 'messages' list": [2], "not alternating": [4],
                              "longer than the context (120 tokens)": [5]}
    assert "lines 4" in caplog.text
    path.write_text(lines[1] + "\n" + lines[3] + "\n")
    with pytest.raises(UserError, match="no valid conversation"):
        tokenize_conversations(str(path), char, max_len=120)
    with pytest.raises(UserError, match="not found"):
        tokenize_conversations(str(tmp_path / "missing.jsonl"), char, max_len=120)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_loss_mask_is_exactly_the_assistant_text_and_its_end_of_turn(kind, char):
    tok = char if kind == "char" else train_tokenizer([TEXT * 20], kind="bpe", vocab_size=300)
    messages = _turns(("What is 2+2?", "It is 4."), ("And 3+3?", "6, of course."), system="Answer in short.")
    ids, mask = tok.chat_ids_and_mask(messages)
    # Independent of the template machinery: the ChatML text written by hand, with the learned spans marked.
    parts = [(f"{IM_START}system\nAnswer in short.{IM_END}\n{IM_START}user\nWhat is 2+2?{IM_END}\n"
              f"{IM_START}assistant\n", False), (f"It is 4.{IM_END}", True),
             (f"\n{IM_START}user\nAnd 3+3?{IM_END}\n{IM_START}assistant\n", False), (f"6, of course.{IM_END}", True),
             ("\n", False)]
    learned = np.concatenate([np.full(len(text), flag) for text, flag in parts])
    assert tok.decode(ids, skip_special_tokens=False) == "".join(text for text, _ in parts)
    start = 0
    for token, in_loss in zip(ids, mask):  # each token's characters must all be on the same side
        width = len(tok.decode([token], skip_special_tokens=False))
        assert set(learned[start:start + width]) == {in_loss}
        start += width


def _reference_best_fit(lengths, capacity):
    """Best-fit decreasing, the obvious quadratic way."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def test_best_fit_packing_matches_the_quadratic_reference():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 60))]
        bins = pack(lengths, 64)
        assert bins == _reference_best_fit(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(pack([40, 30, 30, 24, 10], 64)) == 3  # 40+24, 30+30, 10
    with pytest.raises(ValueError):
        pack([65], 64)


def test_rows_mask_padding_and_boundaries_and_packing_switch(char):
    chats, _ = tokenize_conversations_from(char, [_turns(("hi", "hello")), _turns(("yo", "hey there")),
                                                  _turns(("q", "a"))])
    lengths = [len(c.ids) for c in chats]
    rows = build_rows(chats, seq_len=63, pad_id=char.pad_id)
    assert len(rows) == 2 and rows.ids.shape == (2, 64)
    x, y, docs = rows.batch(np.arange(len(rows)))
    assert x.shape == y.shape == docs.shape == (2, 63)
    for r in range(len(rows)):
        valid = rows.documents[r] != PAD_DOCUMENT
        assert valid.sum() == sum(lengths[i] for i in pack(lengths, 64)[r])
        assert (rows.ids[r][~valid] == char.pad_id).all()
        # learned targets: mask on, same document as the input, never padding
        expect = rows.mask[r, 1:] & (rows.documents[r, 1:] == rows.documents[r, :-1]) & valid[1:]
        assert ((y[r] != IGNORE_INDEX) == expect).all()
        assert (y[r][expect] == rows.ids[r, 1:][expect]).all()
    learned = char.decode(y[y != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert sorted(learned.split(IM_END)[:-1]) == ["a", "hello", "hey there"]
    unpacked = build_rows(chats, seq_len=63, pad_id=char.pad_id, packing=False)
    assert len(unpacked) == 3 and set(np.unique(unpacked.documents)) == {PAD_DOCUMENT, 0}
    with pytest.raises(ValueError, match="longer than a row"):
        build_rows(chats, seq_len=10, pad_id=char.pad_id, packing=False)


def tokenize_conversations_from(tok, conversations, max_len=64, tmp=None):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        handle.write("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return tokenize_conversations(handle.name, tok, max_len)


def test_batches_cover_every_row_each_epoch_and_resume_exactly(char):
    chats, _ = tokenize_conversations_from(char, [_turns((f"q{i}", "a" * (i % 7 + 1))) for i in range(10)], 40)
    rows = build_rows(chats, seq_len=39, pad_id=char.pad_id, packing=False)
    loader = ChatBatches(rows, batch_size=3, seed=5)
    seen = np.concatenate([loader.next_batch()[0] for _ in range(4)])[:10]  # 12 rows drawn, first 10 = epoch 0
    assert sorted(map(tuple, seen)) == sorted(map(tuple, rows.ids[:, :-1]))
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(5)]
    again = ChatBatches(rows, batch_size=3, seed=0)
    again.load_state_dict(state)
    for a, b in zip(expected, [again.next_batch() for _ in range(5)]):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    halves = [ChatBatches(rows, batch_size=3, seed=5, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), ChatBatches(rows, 6, seed=5).next_batch()[0])


def test_hf_dataset_with_a_messages_column(char, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"messages": [_turns(("hi", "hello")), [{"role": "user", "content": "x"}]]})
    ds.save_to_disk(str(tmp_path / "ds"))
    chats, report = tokenize_conversations(f"hf:{tmp_path / 'ds'}", char, max_len=64)
    assert len(chats) == 1 and report.invalid == {"not alternating": [2]}
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(UserError, match="no 'messages' column"):
        tokenize_conversations(f"hf:{tmp_path / 'plain'}", char, max_len=64)


def test_default_conversations_are_valid_and_share_one_answer_format():
    conversations = default_conversations(max_files=40)
    assert len(conversations) > 20
    for messages in conversations:
        assert check_conversation(messages) is None
        for answer in (m["content"] for m in messages if m["role"] == "assistant"):
            assert answer.startswith("`") and "(" in answer and "`: " in answer
