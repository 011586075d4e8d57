"""FSDP2 on CPU: two gloo processes under torchrun (a test needs more than one process, so this file,
not test_combinations, holds them).

The jobs train a tiny model on a periodic token stream with a global batch of 8 in 2 micro-steps,
gradient checkpointing on and clipping at 0.05, so every step is clipped (a norm over one rank's
shards only fails the weight comparison; checked by mutation). What is held, and to what tolerance:
- FSDP on 2 ranks follows one process with the same global batch: losses rel 1e-5 (fp32; only the
  order of the gradient sums differs), final weights 1e-4 (dense here, MoE under ``slow``).
- Resharding: a sharded checkpoint saved by 2 ranks resumed by 1, and saved by 1 resumed by 2, gives
  the next losses of the uninterrupted run within rel 1e-5; 2 -> 2 repeats it exactly.
- Memory: per-rank parameter + optimizer bytes (the local shards' sizes) are half of one whole
  replica's (what DDP holds on each rank) within 5% (uneven shards of odd dimensions).
- SIGTERM to the ranks saves a complete checkpoint and exits 0; a killed rank leaves no checkpoint
  that --resume would take (slow).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from custom_llm.checkpoint_io import list_checkpoints, load_checkpoint_model
from custom_llm.errors import ConfigError
from custom_llm.training.checkpoint import RESUME_FILES, latest_checkpoint
from custom_llm.training.metrics import read_metrics

JOB = '''
import json, os, sys, types
import numpy as np
import torch
from custom_llm.config import ModelConfig
from custom_llm.training.config import TrainConfig
from custom_llm.training.fsdp import local_numel
from custom_llm.training.loop import train_loop
from custom_llm.training.parts import build_parts

run_dir, args = sys.argv[1], json.loads(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
with open(f"{run_dir}-pid{rank}", "w") as f:
    f.write(str(os.getpid()))
rng = np.random.default_rng(0)
base = rng.integers(0, 64, size=31)
tokens = np.concatenate([np.roll(base, i) for i in range(120)]).astype(np.uint16)
data = types.SimpleNamespace(train=tokens[:3400], val=tokens[3400:])
model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                    grad_checkpointing=True, **args.get("model", {}))
train = dict(max_steps=4, batch_size=8, grad_accum_steps=2, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=2,
             eval_batch_size=4, log_every=1, save_every=2, keep_checkpoints=10, device="cpu", precision="fp32",
             sample_tokens=0, parallel="fsdp", grad_clip=0.05)
parts = build_parts(model, TrainConfig(**{**train, **args.get("train", {})}), data.train)
forwards, scatters = [0], []  # training forwards so far, and that count at each gradient reduce-scatter
parts.net.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
if rank == args.get("nan_rank") and "nan_forward" in args:  # poison one micro-step's loss on one rank
    parts.net.register_forward_hook(lambda module, inputs, out: (out[0] * float("nan"),) + tuple(out[1:])
                                    if forwards[0] == args["nan_forward"] else None)
# what FSDP2 calls (reduce_scatter_tensor before torch 2.9), looked up on the module at each call
name = "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") else "reduce_scatter_tensor"
reduce_scatter = getattr(torch.distributed, name)


def counting_reduce_scatter(*a, **k):
    scatters.append(forwards[0])
    return reduce_scatter(*a, **k)


setattr(torch.distributed, name, counting_reduce_scatter)
train_loop(parts, run_dir, data, progress=False, resume=args.get("resume", False))
state = parts.optimizer.state.values()
sizes = {"params": sum(local_numel(p) * p.element_size() for p in parts.model.parameters()),
         "optimizer": sum(local_numel(t) * t.element_size() for s in state for t in s.values() if t.dim() > 0)}
with open(f"{run_dir}-bytes{rank}.json", "w") as f:
    json.dump({**sizes, "reduce_scatters": scatters}, f)
'''


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _command(script, run_dir, ranks, args):
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(ranks)]
    return launcher + [str(script), str(run_dir), json.dumps(args)]


def run_job(tmp, name, ranks, args=None, copy_from=None):
    """Run the job on ``ranks`` processes into tmp/name (after copying checkpoint ``copy_from`` there)."""
    script = tmp / "job.py"
    script.write_text(JOB)
    if copy_from is not None:
        shutil.copytree(copy_from, tmp / name / copy_from.name)
    subprocess.run(_command(script, tmp / name, ranks, args or {}), check=True, timeout=240, env=_env())
    return {r["step"]: r["loss"] for r in read_metrics(tmp / name / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    """One process and FSDP on 2 ranks, 4 steps each, sharded checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, run_job(tmp, "single", 1), run_job(tmp, "fsdp2", 2)


def test_fsdp_follows_one_process_and_consolidates(dense_runs):
    tmp, single, fsdp = dense_runs
    assert sorted(fsdp) == [1, 2, 3, 4]
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5), step
    assert single[4] < single[1] - 0.2  # it learns
    # the 2-rank DCP folder holds one file per rank; load_model consolidates it into full tensors
    ckpt = tmp / "fsdp2" / "ckpt-4"
    assert not (ckpt / "model.safetensors").exists() and len(list((ckpt / "dcp").glob("*.safetensors"))) == 2
    ours, reference = load_checkpoint_model(ckpt), load_checkpoint_model(tmp / "single" / "ckpt-4")
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradients_are_reduce_scattered_only_on_the_last_micro_step(dense_runs):
    tmp, _, _ = dense_runs
    for rank in (0, 1):
        scatters = json.loads((tmp / f"fsdp2-bytes{rank}.json").read_text())["reduce_scatters"]
        # 4 steps of 2 micro-steps: after forwards 2, 4, 6, 8, one reduce-scatter per FSDP unit (2 blocks + root)
        assert scatters == [2] * 3 + [4] * 3 + [6] * 3 + [8] * 3, (rank, scatters)


def test_fsdp_rank_holds_half_of_a_replica(dense_runs):
    tmp, _, _ = dense_runs
    whole = json.loads((tmp / "single-bytes0.json").read_text())  # one process = what each DDP rank holds
    for rank in (0, 1):
        shard = json.loads((tmp / f"fsdp2-bytes{rank}.json").read_text())
        for key in ("params", "optimizer"):
            assert shard[key] / whole[key] == pytest.approx(0.5, abs=0.025), (rank, key, shard, whole)


def test_planner_parameter_and_optimizer_bytes_match_the_shards(dense_runs):
    from custom_llm.config import ModelConfig
    from custom_llm.training.memory import model_sizes, plan_memory

    tmp, _, _ = dense_runs
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    plan = plan_memory(cfg, model_sizes(cfg, 16), "zero3", 2, 1, 16, "fp32", "adamw", True, 1e12)
    for rank in (0, 1):
        shard = json.loads((tmp / f"fsdp2-bytes{rank}.json").read_text())
        assert plan.params == pytest.approx(shard["params"], rel=0.15)
        assert plan.optimizer == pytest.approx(shard["optimizer"], rel=0.15)


def test_consolidate_writes_the_full_weights(dense_runs, tmp_path):
    from custom_llm.cli import main

    tmp, _, _ = dense_runs
    assert main(["consolidate", str(tmp / "fsdp2" / "ckpt-4"), "--out", str(tmp_path / "out")]) == 0
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = load_checkpoint_model(tmp / "fsdp2" / "ckpt-4")
    assert "lm_head.weight" not in written  # tied: stored once, as model.safetensors always does
    for name, tensor in written.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert main(["consolidate", str(tmp / "single" / "ckpt-4" / "nothing")]) == 2


def test_saved_by_two_ranks_resumes_on_one(dense_runs):
    tmp, single, fsdp = dense_runs
    resumed = run_job(tmp, "resume-2to1", 1, {"resume": True}, copy_from=tmp / "fsdp2" / "ckpt-2")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(fsdp[step], rel=1e-5), step


def test_incomplete_sharded_checkpoints_are_never_resumed(dense_runs, tmp_path):
    tmp, _, _ = dense_runs
    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(tmp / "fsdp2" / f"ckpt-{step}", run / f"ckpt-{step}")
    assert latest_checkpoint(run).name == "ckpt-4" and list_checkpoints(run) == list_checkpoints(run, RESUME_FILES)
    shard = sorted((run / "ckpt-4" / "dcp").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # a rank's file cut short
    assert latest_checkpoint(run).name == "ckpt-2"
    shard.unlink()  # a rank's file missing
    assert latest_checkpoint(run).name == "ckpt-2"
    (run / "ckpt-2" / "dcp" / "index.json").unlink()  # rank 0 never finished
    assert latest_checkpoint(run) is None


@pytest.mark.slow
def test_saved_by_one_rank_resumes_on_two_and_two_on_two_exactly(dense_runs):
    tmp, single, fsdp = dense_runs
    resumed = run_job(tmp, "resume-1to2", 2, {"resume": True}, copy_from=tmp / "single" / "ckpt-2")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step
    same = run_job(tmp, "resume-2to2", 2, {"resume": True}, copy_from=tmp / "fsdp2" / "ckpt-2")
    assert [same[3], same[4]] == [fsdp[3], fsdp[4]]
    w1 = load_checkpoint_model(tmp / "fsdp2" / "ckpt-4").state_dict()
    w2 = load_checkpoint_model(tmp / "resume-2to2" / "ckpt-4").state_dict()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name


@pytest.mark.slow
def test_moe_fsdp_follows_one_process(tmp_path):
    # The load-balancing loss multiplies two means over a rank's micro-batch (Switch, Fedus et al. 2021),
    # so with it on, data-parallel ranks (DDP or FSDP) optimise a slightly different objective than one
    # process (~5e-5 relative by step 2); off here, the router z-loss (a plain mean) stays on.
    moe = {"model": {"n_experts": 4, "moe_top_k": 2, "moe_ffn_dim": 32, "moe_aux_loss_coef": 0.0}}
    single, fsdp = run_job(tmp_path, "single", 1, moe), run_job(tmp_path, "fsdp2", 2, moe)
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5), step
    a, b = load_checkpoint_model(tmp_path / "fsdp2" / "ckpt-4"), load_checkpoint_model(tmp_path / "single" / "ckpt-4")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_with_compiled_blocks_lion_and_uneven_eval_batches(tmp_path):
    """Per-block torch.compile under fully_shard (CPU inductor: slow to compile), Lion on DTensor shards, and
    3 validation batches over 2 ranks (each rank must run as many forwards as the other)."""
    args = {"train": {"optimizer": "lion", "lr": 3e-4, "max_steps": 2, "save_every": 0, "eval_every": 2,
                      "eval_batches": 3}}
    single = run_job(tmp_path, "single", 1, args)
    fsdp = run_job(tmp_path, "fsdp2", 2, {"train": {**args["train"], "compile": True}})
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5), step
    val = [[r["val_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "val_loss" in r]
           for name in ("single", "fsdp2")]
    assert val[1] == pytest.approx(val[0], rel=1e-5)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's loss is NaN in the first micro-step of step 2: its gradient reaches every rank's shards through
    the reduce-scatter, the global norm is NaN everywhere, so every rank skips the update and training goes on."""
    losses = run_job(tmp_path, "run", 2, {"nan_rank": 1, "nan_forward": 3})
    state = json.loads((tmp_path / "run" / "ckpt-4" / "trainer_state.json").read_text())
    assert state["bad_steps"] == 1 and sorted(losses) == [1, 3, 4]  # step 2 logged without a loss
    weights = load_checkpoint_model(tmp_path / "run" / "ckpt-4").state_dict()
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def _start(tmp, name, args):
    script = tmp / "job.py"
    script.write_text(JOB)
    return subprocess.Popen(_command(script, tmp / name, 2, args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _rank_pids(tmp, name, proc):
    for rank in (0, 1):
        _wait_for(tmp / f"{name}-pid{rank}", proc)
    return [int((tmp / f"{name}-pid{rank}").read_text()) for rank in (0, 1)]


def test_sigterm_to_the_ranks_saves_a_complete_checkpoint_and_exits_0(tmp_path):
    proc = _start(tmp_path, "run", {"train": {"max_steps": 500, "save_every": 0}})
    try:
        _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
        for pid in _rank_pids(tmp_path, "run", proc):
            os.kill(pid, signal.SIGTERM)  # what SLURM's scancel does to every task
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    ckpt = latest_checkpoint(tmp_path / "run")
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert ckpt.name == f"ckpt-{step}" and 0 < step < 500
    assert load_checkpoint_model(ckpt) is not None


@pytest.mark.slow
def test_a_killed_rank_leaves_no_checkpoint_that_resume_would_take(tmp_path):
    proc = _start(tmp_path, "run", {"train": {"max_steps": 500, "save_every": 1, "keep_checkpoints": 500}})
    try:
        _wait_for(tmp_path / "run" / "ckpt-3", proc)
        os.kill(_rank_pids(tmp_path, "run", proc)[1], signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    folders = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*"))
    complete = [p.name for p in list_checkpoints(tmp_path / "run", RESUME_FILES)]
    assert folders and sorted(complete) == folders  # every folder named ckpt-<step> is whole
    resumed = run_job(tmp_path, "run", 1, {"resume": True, "train": {"max_steps": 1}})  # nothing to do, loads fine
    assert resumed


def test_fsdp_refuses_what_it_cannot_run():
    from custom_llm.config import ModelConfig
    from custom_llm.training.config import TrainConfig, check_run_config

    with pytest.raises(ConfigError, match="fsdp does not support train.optimizer muon"):
        TrainConfig(parallel="fsdp", optimizer="muon")
    with pytest.raises(ConfigError, match="fsdp does not support train.precision fp16"):
        TrainConfig(parallel="fsdp", precision="fp16")
    with pytest.raises(ConfigError, match="train.parallel must be one of ddp, fsdp"):
        TrainConfig(parallel="zero")
    with pytest.raises(ConfigError, match="fsdp does not support model.layerdrop"):
        check_run_config(ModelConfig(layerdrop=0.1), TrainConfig(parallel="fsdp"))


@pytest.mark.parametrize("saved_ranks,resumed_ranks", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_loader_resumes_the_global_batch_stream_on_another_world_size(saved_ranks, resumed_ranks):
    """The loader draws each global batch from one generator; a state saved by W ranks continues the same
    global stream on W' ranks (rank r of W' reads rows r*B/W' .. of each global batch)."""
    import numpy as np

    from custom_llm.data.loader import BatchLoader

    tokens = np.arange(5000, dtype=np.uint16) % 997
    B, T = 8, 16

    def loaders(ranks):
        return [BatchLoader(tokens, B // ranks, T, seed=3, rank=r, world_size=ranks) for r in range(ranks)]

    def global_batch(group):
        return np.concatenate([loader.next_batch()[0] for loader in group])  # (B, T), rank order

    uninterrupted = loaders(1)[0:1]
    expected = [global_batch(uninterrupted) for _ in range(6)]
    before = loaders(saved_ranks)
    for step in range(3):
        np.testing.assert_array_equal(global_batch(before), expected[step])
    state = json.loads(json.dumps(before[0].state_dict()))  # rank 0's state, through JSON as a checkpoint keeps it
    after = loaders(resumed_ranks)
    for loader in after:
        loader.load_state_dict(state)
    for step in range(3, 6):
        np.testing.assert_array_equal(global_batch(after), expected[step])


def test_one_rank_fsdp_run_resumes_from_its_sharded_checkpoint_exactly(tmp_path):
    """In-process (one rank trains unsharded but saves the DCP folder): 2 + 2 steps equal 4 straight, bit for bit,
    MoE and accumulation on."""
    import types

    import numpy as np

    from custom_llm.config import ModelConfig
    from custom_llm.training.config import TrainConfig
    from custom_llm.training.loop import train

    tokens = np.concatenate([np.roll(np.arange(31), i) for i in range(60)]).astype(np.uint16)
    data = types.SimpleNamespace(train=tokens[:1700], val=tokens[1700:])
    mc = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, n_experts=4,
                     moe_top_k=2, moe_ffn_dim=32)
    cfg = dict(max_steps=4, batch_size=4, grad_accum_steps=2, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=1,
               eval_batch_size=2, log_every=1, device="cpu", precision="fp32", sample_tokens=0, parallel="fsdp")
    train(mc, TrainConfig(**cfg), tmp_path / "straight", data, progress=False)
    train(mc, TrainConfig(**{**cfg, "max_steps": 2}), tmp_path / "resumed", data, progress=False)
    assert (tmp_path / "resumed" / "ckpt-2" / "dcp" / "index.json").is_file()
    train(mc, TrainConfig(**cfg), tmp_path / "resumed", data, resume=True, progress=False)
    a = load_checkpoint_model(tmp_path / "straight" / "ckpt-4").state_dict()
    b = load_checkpoint_model(tmp_path / "resumed" / "ckpt-4").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
