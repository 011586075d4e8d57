"""The training loop: gradient accumulation equivalence, non-finite steps, what a run writes."""

import json
import math
import types

import numpy as np
import pytest
import torch

from custom_llm import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training import compiling
from custom_llm.training.loop import TrainingStopped, train, train_loop
from custom_llm.training.parts import build_parts
from custom_llm.training.plan import plan_step
from custom_llm.training.state import TrainState
from custom_llm.training.step import train_step

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 64, size=29)
    tokens = np.concatenate([np.roll(base, i) for i in range(n // 29 + 1)])[:n].astype(np.uint16)
    return types.SimpleNamespace(train=tokens[: n * 9 // 10], val=tokens[n * 9 // 10:])


def config(**kw):
    base = dict(max_steps=4, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=4,
                log_every=1, device="cpu", precision="fp32", sample_tokens=0)
    return TrainConfig(**{**base, **kw})


def _one_step(parts):
    """One optimizer step of a fresh run through the public seams (plan, batch, step)."""
    plan = plan_step(TrainState(), parts.mc, parts.tc, parts.rt.world_size)
    parts.loader.set_shape(plan.rank_batch, plan.seq_len)
    return train_step(parts, plan, *parts.loader.next_batch(), stop_requested=False)


def _captured_grads(parts):
    """Run one step, recording the gradients its optimizer would apply (and not applying them)."""
    grads = {}

    def record(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in parts.model.named_parameters()})

    parts.optimizer.step = record
    return _one_step(parts).loss, grads


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    from custom_llm.data import BatchLoader
    from custom_llm.model import Transformer

    data = dataset()
    cfg = dict(grad_clip=0.0)
    loss1, grads1 = _captured_grads(build_parts(MODEL, config(**cfg), data.train))
    loss4, grads4 = _captured_grads(build_parts(MODEL, config(grad_accum_steps=4, **cfg), data.train))
    # independent reference: the same initial weights and batch, one plain backward pass
    torch.manual_seed(0)
    model = Transformer(MODEL)
    x, y = map(torch.from_numpy, BatchLoader(data.train, 8, 16, seed=0).next_batch())
    out = model.compute_loss(x, y)
    out.loss.backward()
    assert loss1 == pytest.approx(out.lm_loss.item(), rel=1e-6)
    assert loss4 == pytest.approx(out.lm_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads1[name], p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads4[name], p.grad, rtol=1e-5, atol=1e-7)


def test_non_finite_step_is_skipped_and_run_stops_after_max_bad(tmp_path):
    data = dataset()
    parts = build_parts(MODEL, config(max_bad_steps=3, max_steps=10), data.train)
    real = parts.model.compute_loss

    def poisoned(x, y):
        out = real(x, y)
        out.loss = out.loss * float("nan")
        out.lm_loss = out.lm_loss * float("nan")
        return out

    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    parts.model.compute_loss = poisoned
    assert not _one_step(parts).applied
    for name, p in parts.model.named_parameters():
        assert torch.equal(p, before[name]), name  # no update
    with pytest.raises(TrainingStopped, match="3 consecutive steps had a non-finite loss.*lower --train.lr$"):
        train_loop(parts, tmp_path / "run", data, progress=False)  # fp32: no advice to change precision
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_steps"] == 3 and "loss" not in rows[-1]
    assert not list((tmp_path / "run").glob("ckpt-*"))


def test_run_writes_metrics_plot_and_keeps_newest_checkpoints(tmp_path):
    run = tmp_path / "run"
    cfg = config(max_steps=6, save_every=2, keep_checkpoints=2, eval_every=3, schedule="wsd",
                 curriculum=[dict(seq_len=8, batch_size=4, max_steps=3), dict(seq_len=16, batch_size=8)])
    result = train(MODEL, cfg, run, dataset(), progress=False, reference_loss=4.0)
    assert result.step == 6 and result.stopped == "done" and result.tokens == 3 * 4 * 8 + 3 * 8 * 16
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-4", "ckpt-6"]
    assert (run / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all({"tokens", "lr", "stage"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    change = [r for r in rows if "stage_change" in r]
    assert change[0]["step"] == 3 and change[0]["stage_change"]["reason"] == "max_steps"
    # sqrt rule: stage 0 has batch 4 against the base batch 8 -> lr x sqrt(1/2) during warmup-free plateau
    assert rows[0]["lr"] == pytest.approx(1e-2 * math.sqrt(0.5))
    assert result.val_loss == pytest.approx(rows[-1]["val_loss"])
    state = json.loads((run / "ckpt-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["curriculum"]["stage"] == 1 and len(state["evals"]) == 2
    config_json = json.loads((run / "ckpt-6" / "config.json").read_text())
    assert config_json["format"] == "custom-llm" and config_json["train"]["max_steps"] == 6


def test_moe_run_logs_expert_load(tmp_path):
    moe = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, n_experts=4,
                      moe_top_k=2, moe_ffn_dim=32)
    train(moe, config(max_steps=2), tmp_path / "run", dataset(), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    load = rows[0]["moe_load"]
    assert len(load) == 2 and len(load[0]) == 4 and sum(load[0]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("precision,compile", [("bf16", True), ("fp16", False)])
def test_cuda_mixed_precision_trains(tmp_path, precision, compile):
    cfg = config(max_steps=8, device="cuda", precision=precision, compile=compile, lr=3e-3)
    result = train(MODEL, cfg, tmp_path / "run", dataset(), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert result.stopped == "done" and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    state = json.loads((tmp_path / "run" / "ckpt-8" / "trainer_state.json").read_text())
    assert state["precision"] == precision


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    """A CUDA OOM inside the loop becomes one user error that says what to turn down."""
    from custom_llm.errors import UserError
    from custom_llm.training import loop

    def run_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train_step", run_out_of_memory)
    with pytest.raises(UserError) as info:
        train(MODEL, config(max_steps=1), tmp_path / "run", dataset(), progress=False)
    message = str(info.value)
    assert "out of memory" in message and "grad_accum_steps" in message and "grad_checkpointing" in message
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # anything else keeps its traceback
        train(MODEL, config(max_steps=1), tmp_path / "run2", dataset(), progress=False)


def test_metrics_are_mirrored_to_tensorboard_when_installed(tmp_path, monkeypatch):
    """With tensorboard importable, every finite scalar of a row goes to add_scalar at the row's step."""
    import sys

    from custom_llm.training.metrics import MetricsWriter, read_metrics

    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 3, "loss": 2.5, "lr": 1e-3, "val_loss": float("nan"), "stage": "warmup"})
    writer.close()
    assert calls == [("open", str(tmp_path / "tensorboard"), None), ("loss", 2.5, 3), ("lr", 1e-3, 3), ("close",)]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5


def test_compile_decision_follows_the_toolchain(monkeypatch, caplog):
    """Explicit compile without a toolchain is an error; the CUDA default falls back to eager with a warning."""
    from custom_llm.errors import UserError

    asked = []

    def missing(device):
        asked.append(device.type)
        return "Triton is not installed"

    monkeypatch.setattr(compiling, "compile_toolchain_problem", missing)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(UserError, match="train.compile: .*Triton is not installed.*--train.compile false"):
        compiling.use_compile(True, cuda)
    with caplog.at_level("WARNING", logger="custom_llm.training"):
        assert compiling.use_compile(None, cuda) is False
    assert "training without torch.compile: Triton is not installed" in caplog.text
    asked.clear()
    assert compiling.use_compile(False, cuda) is False
    assert compiling.use_compile(None, cpu) is False  # CPU default: eager, nothing probed
    assert asked == []
    monkeypatch.setattr(compiling, "compile_toolchain_problem", lambda device: None)
    assert compiling.use_compile(True, cpu) is True
    assert compiling.use_compile(None, cuda) is True


def test_compiled_cpu_training_evaluates_eagerly():
    """With compiled blocks on the CPU, a validation pass compiles nothing (no second, eval-mode graph to
    wait for), and it measures the same loss as an uncompiled model with the same weights."""
    from torch._dynamo.utils import counters

    from custom_llm.training import loop

    data = dataset()
    compiled = build_parts(MODEL, config(compile=True), data.train)
    plain = build_parts(MODEL, config(compile=False), data.train)
    torch._dynamo.reset()
    counters.clear()
    val = loop._measure(compiled, data, TrainState())["val_loss"]
    assert sum(counters["stats"].values()) == 0 and not counters["frames"], dict(counters)
    assert val == pytest.approx(loop._measure(plain, data, TrainState())["val_loss"], abs=1e-6)


def test_auto_precision_on_an_amx_cpu_trains_in_bf16_and_says_why(monkeypatch, caplog, tmp_path):
    """precision auto picks bf16 on a CPU with AMX (forced here), trains in it (trainer_state says so) and
    the start line says why and how to keep fp32."""
    from custom_llm.training import distributed

    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: True)
    with caplog.at_level("INFO", logger="custom_llm.training"):
        result = train(MODEL, config(precision="auto", max_steps=2), tmp_path / "run", dataset(), progress=False)
    assert result.step == 2
    state = json.loads(next((tmp_path / "run").glob("ckpt-*/trainer_state.json")).read_text())
    assert state["precision"] == "bf16"
    assert "bf16 (auto: this CPU has AMX; --precision fp32 trains in fp32) on cpu" in caplog.text
