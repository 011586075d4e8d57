"""``custom-llm chat``: template prompts, streamed answers with history, commands, Ctrl-C, scripted stdin."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

from custom_llm.cli.chat import ChatSession, _stream_answer, run_chat
from custom_llm.config import ModelConfig
from custom_llm.model import Transformer
from custom_llm.tokenizers import train_tokenizer

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from custom_llm.checkpoint_io import save_model

    tokenizer = train_tokenizer([TEXT], kind="char").with_chat_tokens()
    torch.manual_seed(2)  # with this seed and scale greedy answers are varied text, some ended by <|im_end|>
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=160, init_std=0.3)).eval()
    folder = tmp_path_factory.mktemp("chat") / "ckpt"
    save_model(model, folder)
    tokenizer.save(folder)
    return folder, model, tokenizer


def _greedy_reference(model, tokenizer, messages, max_new):
    """The answer by a naive loop: full forward each step, argmax, stop at a stop id."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in tokenizer.stop_ids:
                break
            out.append(token)
    return tokenizer.decode(out)


def _args(folder, **overrides):
    kw = dict(ckpt=str(folder), device="cpu", dtype="float32", system=None, max_new_tokens=20, temperature=0.0,
              top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, quantize=None, group_size=32)
    kw.update(overrides)
    return argparse.Namespace(**kw)


def test_scripted_stdin_one_message_per_line_keeps_history(checkpoint, monkeypatch, capsys):
    folder, model, tokenizer = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\n/settings max_new_tokens=12\nAnd again?\n"))
    assert run_chat(_args(folder, system="Be brief.")) == 0
    out = capsys.readouterr()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = _greedy_reference(model, tokenizer, history, 20)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And again?"}]
    second = _greedy_reference(model, tokenizer, history, 12)
    assert out.out == f"{first}\n{second}\n"
    assert 0 < len(first) < 20 and len(set(first + second)) > 4  # the first answer ended at <|im_end|>
    assert "max_new_tokens=12" in out.err


class _Interrupting:
    """An engine whose stream raises KeyboardInterrupt (Ctrl-C) after ``after`` tokens."""

    def __init__(self, engine, after):
        self.engine, self.after = engine, after
        self.device, self.model, self.has_full_attention = engine.device, engine.model, engine.has_full_attention

    def stream(self, *args):
        for i, token in enumerate(self.engine.stream(*args)):
            if i == self.after:
                raise KeyboardInterrupt
            yield token


def _session(model, tokenizer, engine=None, **settings):
    from custom_llm.generation import Engine

    base = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, max_new_tokens=30)
    base.update(settings)
    return ChatSession(engine or Engine(model), tokenizer, base)


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(checkpoint, capsys):
    _, model, tokenizer = checkpoint
    from custom_llm.generation import Engine

    session = _session(model, tokenizer, _Interrupting(Engine(model), after=3))
    _stream_answer(session, "hi")
    out = capsys.readouterr().out
    assert out.endswith(" [stopped]\n")
    partial = session.history[-1]["content"]
    assert session.history[-1]["role"] == "assistant" and len(tokenizer.encode(partial)) == 3
    assert out == partial + " [stopped]\n"
    session.engine = Engine(model)
    _stream_answer(session, "go on")
    expected = _greedy_reference(model, tokenizer, session.history[:-1], 30)
    assert capsys.readouterr().out == expected + "\n" and len(session.history) == 4


def test_commands(checkpoint):
    _, model, tokenizer = checkpoint
    session = _session(model, tokenizer)
    "".join(session.answer("hi"))
    assert len(session.history) == 2
    assert "cleared" in session.command("/reset") and session.history == []
    session.command("/system You are terse.")
    assert session.messages() == [{"role": "system", "content": "You are terse."}]
    assert "temperature=0.5" in session.command("/settings temperature=0.5 top_k=5")
    assert session.params.temperature == 0.5 and session.params.top_k == 5
    assert session.command("/settings top_p=3").startswith("error:") and session.params.top_p == 1.0
    assert "usage" in session.command("/settings nonsense=1")
    assert session.command("/help").startswith("commands")
    assert session.command("just text") is None and "unknown command" in session.command("/frobnicate")
    with pytest.raises(EOFError):
        session.command("/quit")


def test_long_history_drops_the_oldest_exchanges_but_keeps_the_system_message(checkpoint):
    _, model, tokenizer = checkpoint
    session = _session(model, tokenizer, max_new_tokens=10)
    session.system = "sys"
    session.history = [{"role": r, "content": f"{r} turn {i} " * 3} for i in range(8) for r in ("user", "assistant")]
    session.history.append({"role": "user", "content": "latest"})
    ids = session.prompt_ids()
    assert len(ids) + 10 <= 160 and session.history[-1]["content"] == "latest"
    assert session.messages()[0]["role"] == "system" and len(session.history) < 17
    assert session.history[0]["role"] == "user"
