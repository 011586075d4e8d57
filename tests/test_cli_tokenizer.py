"""``custom-llm tokenizer train|encode|decode`` end to end, errors as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from custom_llm.cli import main
from custom_llm.tokenizers import load_tokenizer

TEXT = Path(json.__file__).read_text(encoding="utf-8")


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_train_encode_decode(tmp_path, corpus, capsys, kind):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus), "--out", str(out), "--tokenizer", kind,
                 "--vocab-size", "300"]) == 0
    assert f"{kind} tokenizer" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.kind == kind and (kind == "char" or tok.vocab_size == 320)

    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "import json", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == tok.encode("import json")
    assert main(["tokenizer", "decode", "--tokenizer", str(out / "tokenizer.json"), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "import json\n"


def test_encode_file_and_decode_stdin(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "tok"
    main(["tokenizer", "train", "--data", str(corpus), "--out", str(out), "--tokenizer", "char"])
    capsys.readouterr()
    (tmp_path / "in.txt").write_text("def f():\n    pass\n", encoding="utf-8")
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--file", str(tmp_path / "in.txt")]) == 0
    ids = capsys.readouterr().out.strip()
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(ids))
    assert main(["tokenizer", "decode", "--tokenizer", str(out)]) == 0
    assert capsys.readouterr().out == "def f():\n    pass\n\n"


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--data", "/no/such/file.txt", "--out", "OUT"], "data source not found: /no/such/file.txt"),
    (["tokenizer", "encode", "--tokenizer", "/no/such/dir", "--text", "x"], "/no/such/dir"),
    (["tokenizer", "decode", "--tokenizer", "TOK", "1", "x"], "integer token ids"),
    (["tokenizer", "decode", "--tokenizer", "TOK", "99999"], "outside the vocabulary"),
])
def test_user_errors_are_one_line(tmp_path, corpus, capsys, argv, message):
    main(["tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "tok"), "--tokenizer", "char"])
    capsys.readouterr()
    argv = [str(tmp_path / "tok") if a == "TOK" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
