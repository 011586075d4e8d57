"""``custom-llm train``: flags from the config dataclasses, one error for every problem, an end-to-end run."""

import json

import pytest
import torch

from custom_llm.cli import main
from custom_llm.training.config import resolve_run_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model.n_experts", "--train.curriculum_patience", "--train.lr", "--resume", "--init",
                 "--time-limit", "--precision", "--tokenizer"):
        assert flag in out


def test_bad_values_are_all_reported_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--train.lr", "fast", "--train.optimizer", "sgd",
                 "--model.layerdrop", "2", "--train.batch_size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    for fragment in ("--train.lr", "train.optimizer", "layerdrop", "train.batch_size"):
        assert fragment in err
    assert not out.exists()


def test_config_file_unknown_keys_and_precedence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64, colour: red}\ntrain: {lr: 1e-3, lr_typo: 2}\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "lr_typo" in err
    good = {"model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 2}, "train": {"lr": 1e-3, "max_steps": 7}}
    model, train = resolve_run_config("tiny", good, {"train": {"max_steps": 9}})
    assert model.d_model == 64 and model.vocab_size == 4096  # file over preset, preset fills the rest
    assert train.lr == 1e-3 and train.max_steps == 9  # flags over file


def test_end_to_end_char_run_then_resume(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    out = tmp_path / "run"
    args = ["train", "--data", str(text), "--tokenizer", "char", "--out", str(out), "--max-steps", "4",
            "--save-every", "2", "--device", "cpu", "--no-progress", "--train.cache_dir", str(tmp_path / "cache"),
            "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "4", "--model.n_kv_heads", "2",
            "--model.max_seq_len", "16", "--train.batch_size", "4", "--train.eval_batches", "1",
            "--train.sample_tokens", "8", "--train.curriculum", "[]", "--train.seq_len", "16"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "unigram entropy" in printed and "validation loss" in printed and "sample" in printed
    ckpt = out / "ckpt-4"
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "optimizer.safetensors",
                                                "tokenizer.json", "trainer_state.json"}
    stored = json.loads((ckpt / "config.json").read_text())
    assert stored["model"]["vocab_size"] < 64  # set from the char tokenizer
    assert main(args) == 2  # checkpoints exist: refuse to start over without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args[:-8] + ["--resume", "--max-steps", "6"]) == 0  # continue the same run further
    assert json.loads((out / "ckpt-6" / "trainer_state.json").read_text())["step"] == 6


def test_explicit_compile_without_a_toolchain_fails_before_any_work(tmp_path, capsys):
    """--train.compile true where inductor has no C++ compiler: one error line naming it, nothing written."""
    import torch._inductor.config as inductor_config

    out = tmp_path / "run"
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        code = main(["train", "--out", str(out), "--train.compile", "true", "--train.max_steps", "2",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: train.compile:") and err.count("\n") == 1
    assert "C++ compiler" in err and "--train.compile false" in err
    assert not out.exists()
