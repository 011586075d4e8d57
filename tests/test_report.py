"""``custom-llm report RUN``: the report card of a (hand-made, tiny) run directory."""

import json

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.checkpoint_io import save_model
from custom_llm.cli import main
from custom_llm.evaluation.report import benchmark_rows, training_time_s

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again.\n" for i in range(60))
RESULTS = {"results": {"tiny_mc": {"alias": "tiny_mc", "acc,none": 0.375, "acc_stderr,none": 0.0866,
                                   "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"}},
           "configs": {}, "ckpt": "runs/x"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, data_path):
    from custom_llm.tokenizers import CharTokenizer

    torch.manual_seed(0)
    tokenizer = CharTokenizer.train([TEXT])
    run = tmp_path / "run"
    ckpt = run / "ckpt-20"
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=64)).eval()
    save_model(model, ckpt, extra_config={"train": {"data": [str(data_path)], "val_fraction": 0.1, "lr": 0.001,
                                                    "optimizer": "adamw", "batch_size": 4}})
    tokenizer.save(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 20, "tokens": 2560, "bad_steps": 0}))
    rows = [{"step": 10, "tokens": 1280, "loss": 3.5, "tokens_per_s": 640.0},
            {"step": 20, "tokens": 2560, "loss": 3.0, "tokens_per_s": 320.0, "val_loss": 3.1, "val_ppl": 22.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir()
    (run / "eval" / "tiny.json").write_text(json.dumps(RESULTS))
    (run / "eval" / "other.json").write_text(json.dumps({"not": "results"}))
    return run, model, tokenizer


def test_report_card(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(TEXT[-700:])
    run, model, tokenizer = _run(tmp_path, data)
    assert main(["report", str(run), "--data", str(held_out)]) == 0
    assert main(["eval", "--ckpt", str(run), "--data", str(held_out), "--json", "--device", "cpu"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    page = (run / "report.md").read_text()
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| steps | 20 |" in page and "| tokens | 2,560 |" in page
    assert "0m 06s" in page  # 1280 tokens at 640/s + 1280 at 320/s
    assert f"{model.num_params()['total']:,} total" in page
    assert f"| {expected['loss']:.4f} | {expected['perplexity']:.2f} | {expected['bits_per_byte']:.4f} |" in page
    assert "loss 3.1000 nats/token" in page  # the last value the run logged
    assert "| tiny_mc | acc | none | 0.3750 | 0.0866 | eval/tiny.json |" in page
    assert "| tiny_mc | acc_norm | none | 0.5000 |  | eval/tiny.json |" in page
    assert "other.json" not in page
    assert "## Sample" in page and "| d_model | 32 |" in page


def test_report_uses_the_runs_validation_split_or_says_why_not(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    run, *_ = _run(tmp_path, data)
    assert main(["report", str(run / "ckpt-20"), "--no-sample", "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.md").read_text()
    assert f"validation split of {data}" in page and "bits per byte" in page and "## Sample" not in page
    data.unlink()
    assert main(["report", str(run), "--no-sample"]) == 0
    assert "is not on this machine; pass --data" in (run / "report.md").read_text()


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: run directory not found")


def test_helpers():
    assert training_time_s([{"tokens": 100, "tokens_per_s": 50.0}, {"tokens": 300, "tokens_per_s": 100.0}]) == 4.0
    assert training_time_s([{"step": 1}]) is None
    assert benchmark_rows([("a.json", RESULTS)]) == [("tiny_mc", "acc", "none", 0.375, 0.0866, "a.json"),
                                                    ("tiny_mc", "acc_norm", "none", 0.5, None, "a.json")]
