"""User errors on paths and on --init/--resume: one ``error:`` line, exit 2, nothing written."""

import json
import logging

import pytest

from custom_llm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--device", "cpu", "--no-progress", "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.max_seq_len", "16", "--train.batch_size", "4", "--train.eval_batches", "1",
         "--train.sample_tokens", "0", "--train.curriculum", "[]", "--train.seq_len", "16", "--tokenizer", "char"]


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return text


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unwritable_paths_are_user_errors_before_any_work(tmp_path, corpus, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = tmp_path / "cache"
    assert main(["train", "--data", str(corpus), "--out", str(blocker / "run"), "--train.cache_dir", str(cache),
                 *SMALL]) == 2
    assert "--out" in one_error_line(capsys)
    assert not cache.exists()  # refused before the data was prepared
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--train.cache_dir", str(blocker / "cache"), *SMALL]) == 2
    assert "data cache" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["tokenizer", "train", "--data", str(corpus), "--kind", "char", "--out", str(blocker / "tok")]) == 2
    assert str(blocker) in one_error_line(capsys)


def test_curriculum_stage_missing_field_is_named(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--train.curriculum", '[{"seq_len": 8}]']) == 2
    assert "train.curriculum[0].'batch_size'" in one_error_line(capsys)


def test_init_keeps_the_parameters_and_resume_without_checkpoint_starts(tmp_path, corpus, capsys, caplog):
    base = ["train", "--data", str(corpus), "--train.cache_dir", str(tmp_path / "cache"), "--max-steps", "2", *SMALL]
    first = tmp_path / "first"
    with caplog.at_level(logging.INFO, logger="custom_llm.training"):
        assert main(base + ["--out", str(first), "--resume"]) == 0  # nothing to resume: a new run
    assert "no complete checkpoint" in caplog.text
    capsys.readouterr()

    assert main(base + ["--out", str(tmp_path / "bad"), "--init", str(first), "--model.n_layers", "2"]) == 2
    assert "n_layers" in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "long"), "--init", str(first), "--train.seq_len", "64"]) == 2
    assert "max_seq_len" in one_error_line(capsys)
    assert not (tmp_path / "long").exists()

    tuned = tmp_path / "tuned"
    assert main(base + ["--out", str(tuned), "--init", str(first), "--model.dropout", "0.1"]) == 0
    assert json.loads((tuned / "ckpt-2" / "config.json").read_text())["model"]["dropout"] == 0.1


def test_directory_extension_filter(tmp_path):
    from custom_llm.training.run import _prepare, resolve_job

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.md").write_text("markdown text " * 100)
    (folder / "skip.txt").write_text("plain text that must not be read " * 100)
    overrides = {"model": {"max_seq_len": 16}, "train": {"data": [str(folder)], "extensions": "md", "tokenizer": "char",
                                                         "cache_dir": str(tmp_path / "cache"), "curriculum": []}}
    job = resolve_job(None, None, overrides, str(tmp_path / "run"), False, None)
    tokenizer, dataset = _prepare(job, None)
    text = tokenizer.decode(dataset.train.tolist() + dataset.val.tolist())
    assert "markdown" in text and "plain" not in text


def test_unknown_flags_name_the_subcommand_and_binary_files_are_refused(tmp_path, corpus, capsys):
    assert main(["train", "--model.bogus", "3"]) == 2
    assert one_error_line(capsys).startswith("error: custom-llm train: unrecognized arguments: --model.bogus")
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus), "--kind", "char", "--out", str(tok)]) == 0
    capsys.readouterr()
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["tokenizer", "encode", "--tokenizer", str(tok), "--file", str(binary)]) == 2
    assert "binary" in one_error_line(capsys)
