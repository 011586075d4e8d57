"""Hostile use: two runs in one folder, a full disk, corrupt or mismatched files, endless inputs, bad
values. Each case gets one clear message (exit 2 from the CLI) and loses nothing already written."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from custom_llm import ModelConfig
from custom_llm.cli import main
from custom_llm.errors import UserError
from custom_llm.fsutil import RunDirInUse, run_dir_lock
from custom_llm.training.config import TrainConfig
from custom_llm.training.loop import train

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)


def _dataset(n=2000):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 64, size=n).astype(np.uint16)
    return types.SimpleNamespace(train=tokens[: n * 9 // 10], val=tokens[n * 9 // 10:])


def _config(**kw):
    base = dict(max_steps=2, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2,
                log_every=1, device="cpu", precision="fp32", sample_tokens=0)
    return TrainConfig(**{**base, **kw})


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# --- 1. two writers of one run directory -------------------------------------------------------------

HOLDER = """
import sys, time
from custom_llm.fsutil import run_dir_lock
with run_dir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_process_is_refused_while_the_first_holds_the_run(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"in use by another run \(pid {holder.pid} on "):
            with run_dir_lock(run):
                pass
        with pytest.raises(RunDirInUse):  # the training loop takes the same lock before writing anything
            train(MODEL, _config(), run, _dataset(), progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock file behind; the kernel dropped its flock, so it is taken over.
    assert (run / ".lock").exists()
    with run_dir_lock(run):
        assert (run / ".lock").read_text().startswith(f"pid {os.getpid()}")
    assert not (run / ".lock").exists()
    assert train(MODEL, _config(), run, _dataset(), progress=False).step == 2


def test_two_train_commands_into_one_folder(tmp_path, capsys):
    """Two real `custom-llm train` processes: the second exits 2 naming the first; the first's run is whole."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    common = [sys.executable, "-c", "import sys; from custom_llm.cli import main; sys.exit(main())", "train", "--data", str(corpus), "--tokenizer", "char",
              "--out", str(tmp_path / "race"), "--model.n_layers", "1", "--model.d_model", "32", "--model.n_heads",
              "4", "--model.max_seq_len", "16", "--train.batch_size", "4", "--train.eval_every", "0",
              "--train.sample_tokens", "0", "--train.curriculum", "[]", "--no-progress",
              "--train.cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(common + ["--max-steps", "1000000", "--save-every", "50"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list((tmp_path / "race").glob("ckpt-*")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)  # the first run is training (it has saved a checkpoint)
        second = subprocess.run(common + ["--max-steps", "9", "--model.n_layers", "2"], env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)  # finish the step, save, exit 0
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    assert f"in use by another run (pid {first.pid}" in second.stderr.strip().splitlines()[-1]
    checkpoints = sorted((tmp_path / "race").glob("ckpt-*"), key=lambda p: int(p.name[5:]))
    assert json.loads((checkpoints[-1] / "config.json").read_text())["model"]["n_layers"] == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "race" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's rows, in order
    assert not (tmp_path / "race" / ".lock").exists()


# --- 2. a tokenizer written over a checkpoint's -------------------------------------------------------

def test_tokenizer_train_refuses_a_non_empty_folder_and_generate_checks_the_pair(tmp_path, capsys):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.model import Transformer
    from custom_llm.tokenizers import CharTokenizer

    ckpt = tmp_path / "ckpt"
    save_model(Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)), ckpt)
    CharTokenizer.train(["abc"]).save(ckpt)
    text = tmp_path / "big.txt"
    text.write_text("".join(chr(0x4E00 + i) for i in range(200)) * 3)
    assert main(["tokenizer", "train", "--data", str(text), "--tokenizer", "char", "--out", str(ckpt)]) == 2
    assert "already holds files" in _error_line(capsys) and "--force" in capsys.readouterr().err + "--force"
    before = (ckpt / "tokenizer.json").read_text()
    assert (ckpt / "tokenizer.json").read_text() == before
    assert main(["tokenizer", "train", "--data", str(text), "--tokenizer", "char", "--out", str(ckpt), "--force"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "a", "--max-new-tokens", "2"]) == 2
    assert "do not belong together" in _error_line(capsys)


# --- 3. a full disk ---------------------------------------------------------------------------------

def test_a_full_disk_while_saving_says_what_is_intact(tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    train(MODEL, _config(save_every=1), run, _dataset(), progress=False)  # ckpt-1, ckpt-2

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match=r"no space left on the device holding .*run; checkpoint 4 was not written "
                                        r"and the last complete checkpoint, ckpt-2, is intact"):
        train(MODEL, _config(max_steps=4), run, _dataset(), resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("ckpt", ".ckpt"))) == ["ckpt-1", "ckpt-2"]


def test_a_full_disk_during_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from custom_llm.checkpoint_io import save_model
    from custom_llm.interop import hf
    from custom_llm.model import Transformer

    save_model(Transformer(MODEL), tmp_path / "ckpt")

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")  # safetensors' own error type, as a message

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="no space left on the device holding .*out; nothing was written"):
        hf.export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- 4. corrupt checkpoint files (see also test_training_state) ------------------------------------------

@pytest.mark.parametrize("name, content", [("model.safetensors", b"\x10\x00"), ("config.json", b"{not json"),
                                           ("trainer_state.json", b"{}")])
def test_generate_on_a_run_uses_the_newest_whole_checkpoint(tmp_path, name, content):
    from custom_llm.checkpoint_io import resolve_checkpoint_dir

    run = tmp_path / "run"
    train(MODEL, _config(max_steps=2, save_every=1), run, _dataset(), progress=False)
    (run / "ckpt-2" / name).write_bytes(content)
    expected = "ckpt-2" if name == "trainer_state.json" else "ckpt-1"  # readers need config + weights only
    assert resolve_checkpoint_dir(run).name == expected


# --- 5. text no encoding can represent -----------------------------------------------------------------

def test_lone_surrogates_become_replacement_characters():
    from custom_llm.tokenizers import train_tokenizer

    tok = train_tokenizer(["hello world, import os\n" * 50], kind="bpe", vocab_size=300)
    assert tok.decode(tok.encode("a\udc80b")) == "a\ufffdb"
    assert tok.encode_batch(["a\ud800b"]) == [tok.encode("a\ufffdb")]


def test_invalid_utf8_on_stdin_is_replaced(tmp_path, monkeypatch, capsys):
    from custom_llm.tokenizers import train_tokenizer

    train_tokenizer(["import os\n" * 50], kind="bpe", vocab_size=300).save(tmp_path)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=types.SimpleNamespace(
        read=lambda n: b"import os\n\xff\xfe bad\n")))
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip()


# --- 6. out-of-range values ---------------------------------------------------------------------------

def test_seeds_have_one_rule(tmp_path, capsys):
    for argv in (["generate", "--ckpt", str(tmp_path), "--seed", "99999999999999999999999"],
                 ["generate", "--ckpt", str(tmp_path), "--seed", "-1"],
                 ["train", "--out", str(tmp_path / "r"), "--train.seed", "99999999999999999999999"],
                 ["train", "--out", str(tmp_path / "r"), "--model.layerdrop_seed", "-5"]):
        assert main(argv) == 2, argv
        assert "seed" in _error_line(capsys) and "[0, 9223372036854775807]" in capsys.readouterr().err + "[0, 9223372036854775807]"


# --- 7. malformed Hugging Face configs ----------------------------------------------------------------

@pytest.mark.parametrize("change, message", [({"num_hidden_layers": None}, "num_hidden_layers is missing"),
                                             ({"num_attention_heads": "six"}, "num_attention_heads must be a positive"),
                                             ({"rms_norm_eps": "x"}, "malformed field")])
def test_import_of_a_malformed_hf_config(tmp_path, capsys, change, message):
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, rms_norm_eps=1e-5,
                  max_position_embeddings=64)
    config.update(change)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert message in _error_line(capsys)


# --- 8. endless inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["tokenizer", "encode", "--tokenizer", "TOK", "--file", "/dev/zero"],
                                  ["tokenizer", "train", "--data", "/dev/zero", "--out", "OUT"],
                                  ["train", "--data", "/dev/urandom", "--out", "OUT"]])
def test_devices_and_fifos_are_refused_by_name(tmp_path, capsys, argv):
    from custom_llm.tokenizers import CharTokenizer

    CharTokenizer.train(["abc"]).save(tmp_path / "tok")
    argv = [a.replace("TOK", str(tmp_path / "tok")).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "not a regular file" in line and "/dev/" in line


def test_a_fifo_is_refused(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["tokenizer", "train", "--data", str(fifo), "--out", str(tmp_path / "out")]) == 2
    assert "not a regular file" in _error_line(capsys)


# --- 9-11. misleading behaviour --------------------------------------------------------------------------

def test_piped_prompts_that_fail_give_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    import io

    from custom_llm.checkpoint_io import save_model
    from custom_llm.model import Transformer
    from custom_llm.tokenizers import CharTokenizer

    save_model(Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)), tmp_path)
    CharTokenizer.train(["abcdef"]).save(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("abc\n" + "a" * 40 + "\n"))  # the second fills the context
    assert main(["generate", "--ckpt", str(tmp_path), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "context" in err  # the first prompt was answered, the second refused


@pytest.mark.parametrize("argv, message", [
    (["bench", "--cases", ""], "names no case"), (["bench", "--cases", ","], "names no case"),
    (["generate", "--ckpt", "X", "--stop", ""], "--stop needs a non-empty string"),
    (["generate", "--ckpt", "X", "--temperature", "inf"], "temperature must be a finite number"),
    (["generate", "--ckpt", "X", "--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["generate", "--ckpt", "X", "--device", "mps"], "has: cpu")])
def test_bad_values_get_true_messages(tmp_path, capsys, argv, message):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.model import Transformer
    from custom_llm.tokenizers import CharTokenizer

    save_model(Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)), tmp_path)
    CharTokenizer.train(["abcdef"]).save(tmp_path)
    assert main([a.replace("X", str(tmp_path)) for a in argv]) == 2
    assert message in _error_line(capsys)


def test_export_into_a_file_says_file(tmp_path, capsys):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.model import Transformer

    save_model(Transformer(MODEL), tmp_path / "ckpt")
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "afile")]) == 2
    assert "is an existing file" in _error_line(capsys)
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("exported") == 1


def test_piped_training_prints_plain_progress_lines(tmp_path, caplog):
    with caplog.at_level("INFO", logger="custom_llm.training"):
        train(MODEL, _config(max_steps=40, log_every=1), tmp_path / "run", _dataset(), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert 1 <= len(lines) <= 21 and "\r" not in "".join(lines)  # stderr is not a terminal under pytest
