"""Checkpoint directories through the public API, and the CLI's error contract."""

import argparse
import json

import pytest
import torch

import custom_llm
from custom_llm import ModelConfig, Transformer, UserError
from custom_llm.checkpoint_io import list_checkpoints, load_checkpoint_model, resolve_checkpoint_dir, save_model
from custom_llm.cli import build_parser, main


def _model(**kw):
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                   max_seq_len=16, **kw))


@pytest.mark.parametrize("tied,rezero", [(True, False), (False, True)])
def test_save_and_load_round_trip(tmp_path, tied, rezero):
    model = _model(tie_embeddings=tied, rezero=rezero)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # nothing left at its initial value
    save_model(model, tmp_path / "ckpt-5")
    loaded = custom_llm.load_model(tmp_path / "ckpt-5")
    ids = torch.randint(0, 50, (2, 9))
    model.eval()
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    config = json.loads((tmp_path / "ckpt-5" / "config.json").read_text())
    assert config["format"] == "custom-llm" and config["model"]["tie_embeddings"] == tied


def test_run_directory_resolves_to_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 10):
        save_model(_model(), tmp_path / f"ckpt-{step}")
    (tmp_path / "ckpt-12").mkdir()  # an interrupted save: no files
    (tmp_path / ".ckpt-14.tmp-abc").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2", "ckpt-10"]
    assert resolve_checkpoint_dir(tmp_path).name == "ckpt-10"


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        custom_llm.load_model(tmp_path / "nope")
    save_model(_model(), tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint_model(tmp_path / "a")
    save_model(_model(), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["model"]["d_model"] = 64
    config["model"]["ffn_dim"] = 48
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tensor embed_tokens.weight has shape \(50, 32\), the model expects \(50, 64\)"):
        load_checkpoint_model(tmp_path / "b")


def test_cli_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    expected = {"train", "finetune", "generate", "chat", "serve", "eval", "report", "export", "import", "quantize",
                "consolidate", "plan", "bench", "tokenizer"}
    # The parser's sub-command choices, exactly.
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == expected
    # And the help lists each one as an entry of its own: the lines indented under "COMMAND", up to the
    # blank line that ends the group ("train" alone would also match other help text).
    lines = out.splitlines()
    start = lines.index("  COMMAND") + 1
    end = lines.index("", start)
    listed = [line.split()[0] for line in lines[start:end] if line.startswith("    ") and line[4] != " "]
    assert sorted(listed) == sorted(expected)


def test_cli_bad_flag_is_one_error_line(capsys):
    assert main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
