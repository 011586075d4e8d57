"""``custom-llm generate`` and ``custom-llm eval`` through custom_llm.cli.main, on a tiny char-level checkpoint."""

import io
import json
import math

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.checkpoint_io import save_model
from custom_llm.cli import main
from custom_llm.generation import generate
from custom_llm.generation.evaluate import evaluate_texts

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(directory, zero_head=False, **overrides):
    from custom_llm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train([TEXT + "é"])
    kw = dict(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
              tie_embeddings=False, init_std=0.2)
    kw.update(overrides)
    model = Transformer(ModelConfig(**kw)).eval()
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # uniform predictions: loss is exactly ln V
    save_model(model, directory)
    tokenizer.save(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = _checkpoint(directory)
    return directory, model, tokenizer


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_text_equals_engine_tokens(ckpt, capsys):
    directory, model, tokenizer = ckpt
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(directory), "--prompt", "To be", "--temperature", "0",
                             "--max-new-tokens", "20", "--device", "cpu", "--no-compile")
    assert code == 0, err
    ids = [tokenizer.eos_id] + tokenizer.encode("To be")
    expected = generate(model, [ids], 20, eos_ids=[tokenizer.eos_id])[0]
    assert out == tokenizer.decode(expected) + "\n"


def test_same_seed_same_text(ckpt, capsys):
    directory = str(ckpt[0])
    flags = ["generate", "--ckpt", directory, "--prompt", "the", "--temperature", "1.5", "--top-p", "0.95",
             "--max-new-tokens", "30"]
    a = run_cli(capsys, *flags, "--seed", "1")
    b = run_cli(capsys, *flags, "--seed", "1")
    c = run_cli(capsys, *flags, "--seed", "2")
    assert a[0] == 0 and a[1] == b[1] and a[1] != c[1]


def test_stop_string_ends_output(ckpt, capsys):
    directory = str(ckpt[0])
    flags = ["generate", "--ckpt", directory, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "30"]
    free = run_cli(capsys, *flags)[1].rstrip("\n")
    stop = free[5:7]
    code, out, _ = run_cli(capsys, *flags, "--stop", "@@never", stop)
    assert code == 0 and out == free[:free.index(stop)] + "\n"


def test_interactive_prompts_from_stdin(ckpt, capsys, monkeypatch):
    directory = str(ckpt[0])
    one = run_cli(capsys, "generate", "--ckpt", directory, "--prompt", "to", "--max-new-tokens", "8")[1]
    two = run_cli(capsys, "generate", "--ckpt", directory, "--prompt", "", "--max-new-tokens", "8")[1]
    monkeypatch.setattr("sys.stdin", io.StringIO("to\n\n"))
    code, out, _ = run_cli(capsys, "generate", "--ckpt", directory, "--max-new-tokens", "8")
    assert code == 0 and out == one + two


def test_long_generation_is_capped_to_the_context(ckpt, capsys):
    directory, model, tokenizer = ckpt
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(directory), "--prompt", "to be", "--temperature", "0",
                             "--max-new-tokens", "500")
    assert code == 0 and "at most 42 new tokens" in err  # 48 - (1 start token + 5)
    assert len(out) <= 43


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "top_p"), (["--top-p", "1.2"], "top_p"), (["--temperature", "-1"], "temperature"),
    (["--top-k", "-1"], "top_k"), (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--min-p", "1.5"], "min_p"), (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file"),
    (["--prompt", "to be " * 20], "longer than the model's context"),
])
def test_user_errors_are_one_line_exit_2(ckpt, capsys, flags, message):
    args = ["generate", "--ckpt", str(ckpt[0]), *flags]
    if "--prompt" not in flags and "--prompt-file" not in flags:
        args += ["--prompt", "to"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_missing_checkpoint(capsys, tmp_path, command):
    extra = ["--prompt", "x"] if command == "generate" else ["--data", str(tmp_path)]
    code, _, err = run_cli(capsys, command, "--ckpt", str(tmp_path / "nope"), *extra)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_bits_per_byte_hand_checked(tmp_path):
    """Uniform predictions cost ln V nats per token; with one character per token bpb is
    log2(V) * characters / UTF-8 bytes (2 bytes per 'é')."""
    model, tokenizer = _checkpoint(tmp_path, zero_head=True)
    V = tokenizer.vocab_size
    ascii_result = evaluate_texts(model, tokenizer, ["to be or not"], start_id=tokenizer.eos_id, seq_len=5)
    assert ascii_result.tokens == 12 and ascii_result.bytes == 12
    assert ascii_result.loss == pytest.approx(math.log(V), rel=1e-6)
    assert ascii_result.bits_per_byte == pytest.approx(math.log2(V), rel=1e-6)
    assert ascii_result.perplexity == pytest.approx(V, rel=1e-5)
    accented = evaluate_texts(model, tokenizer, ["éé", "tée"], start_id=tokenizer.eos_id, seq_len=4)
    assert (accented.tokens, accented.bytes) == (5, 8)
    assert accented.bits_per_byte == pytest.approx(math.log2(V) * 5 / 8, rel=1e-6)
    capped = evaluate_texts(model, tokenizer, ["éé", "tée"], start_id=tokenizer.eos_id, seq_len=4, max_tokens=3)
    assert (capped.tokens, capped.bytes) == (3, 5)


def test_eval_matches_mean_loss(ckpt, capsys, tmp_path):
    """The CLI's loss is the mean cross-entropy over [start] + text, cut into windows of seq_len."""
    directory, model, tokenizer = ckpt
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT, encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "--ckpt", str(directory), "--data", str(data), "--json")
    assert code == 0, err
    result = json.loads(out)
    ids = torch.tensor([tokenizer.eos_id] + tokenizer.encode(TEXT))
    nats = 0.0
    with torch.no_grad():
        for chunk in (ids[:49], ids[48:]):  # 48 + 37 predictions (max_seq_len 48)
            nats += model.compute_loss(chunk[None, :-1], chunk[None, 1:]).lm_loss.item() * (len(chunk) - 1)
    assert result["tokens"] == len(TEXT) == 85 and result["bytes"] == len(TEXT.encode())
    assert result["loss"] == pytest.approx(nats / 85, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_eval_bad_seq_len(ckpt, capsys, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("hello", encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(ckpt[0]), "--data", str(data), "--seq-len", "1000")
    assert code == 2 and "max_seq_len" in err
