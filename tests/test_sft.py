"""Supervised fine-tuning: vocabulary growth for chat tokens, the SFT loss and training entry."""

from __future__ import annotations

import pytest
import torch

from custom_llm.config import ModelConfig
from custom_llm.model import Transformer
from custom_llm.training.sft import grow_vocab


def _tiny(**overrides) -> Transformer:
    kw = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_appends_mean_rows_and_keeps_old_logits(tied):
    model = _tiny(tie_embeddings=tied)
    ids = torch.randint(0, 40, (2, 9))
    before = model(ids)
    old_embed, old_head = model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    grow_vocab(model, 42)
    assert model.config.vocab_size == 42 and model.embed_tokens.weight.shape == (42, 32)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    torch.testing.assert_close(model.embed_tokens.weight[40:], old_embed.mean(0).expand(2, -1))
    torch.testing.assert_close(model.lm_head.weight[40:], old_head.mean(0).expand(2, -1))
    after = model(ids)
    torch.testing.assert_close(after[..., :40], before)
    # a new token's logit is the mean of the old logits (linear head): it starts neither likely nor impossible
    torch.testing.assert_close(after[..., 40], before.mean(-1))
    assert grow_vocab(model, 41) is model and model.config.vocab_size == 42  # never shrinks


# --------------------------------------------------------------------------------------------------
# Fine-tuning runs on tiny models (CPU, fp32).

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from custom_llm.data.chat import IGNORE_INDEX, build_rows, tokenize_conversations  # noqa: E402
from custom_llm.model.lora import LoRAConfig  # noqa: E402
from custom_llm.tokenizers import IM_END, train_tokenizer  # noqa: E402
from custom_llm.training.sft import SFTConfig, SFTLoss, prepare_chat_model, run_sft  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!\n"
RUN = {"device": "cpu", "precision": "fp32", "batch_size": 4, "log_every": 1, "eval_batches": 1,
       "eval_batch_size": 4}


def _conversations(path, n=24):
    words = ["apple", "river", "stone", "cloud", "green", "quiet"]
    with open(path, "w") as handle:
        for i in range(n):
            a, b = words[i % 6], words[(i * 5 + 1) % 6]
            messages = [{"role": "user", "content": f"Say {a}"}, {"role": "assistant", "content": f"{a.upper()}!"}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": f"and {b}"}, {"role": "assistant", "content": b.upper()}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def _char_model(seed=0):
    torch.manual_seed(seed)
    tokenizer = train_tokenizer([LETTERS], kind="char")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=128))
    return model, tokenizer


def _reference_loss(model, tokenizer, conversations):
    """Mean cross-entropy over assistant tokens + end-of-turn, each conversation run on its own."""
    total, count = 0.0, 0
    for messages in conversations:
        ids, mask = tokenizer.chat_ids_and_mask(messages)
        logits = model(torch.tensor([ids[:-1]]))[0]
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        learned = torch.tensor(mask[1:])
        total, count = total + float(losses[learned].sum()), count + int(learned.sum())
    return total / count


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_is_the_assistant_only_loss_of_each_conversation_alone(packing, tmp_path):
    model, tokenizer = _char_model()
    model, tokenizer = prepare_chat_model(model.eval(), tokenizer)
    path = _conversations(tmp_path / "c.jsonl", n=6)
    chats, report = tokenize_conversations(path, tokenizer, 128)
    assert report.valid == 6
    rows = build_rows(chats, 127, tokenizer.pad_id, packing=packing)
    assert (len(rows) < len(chats)) == packing
    x, y, docs = (torch.from_numpy(a) for a in rows.batch(np.arange(len(rows))))
    with torch.no_grad():
        loss = SFTLoss(model, packing)(x, y, docs)[1]
        conversations = [json.loads(line)["messages"] for line in open(path)]
        expected = _reference_loss(model, tokenizer, conversations)
    torch.testing.assert_close(float(loss), expected, rtol=1e-5, atol=1e-6)
    assert int((y != IGNORE_INDEX).sum()) == sum(int(np.sum(c.mask[1:])) for c in chats)


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"])])
def test_finetune_learns_the_answers_and_resumes_exactly(lora, tmp_path):
    path = _conversations(tmp_path / "c.jsonl", n=12)
    sft = SFTConfig(data=path, packing=False)
    train = dict(RUN, max_steps=4, eval_every=2, save_every=2, lr=3e-3)
    model, tokenizer = _char_model()
    straight = run_sft(model, tokenizer, sft, train, tmp_path / "straight", lora=lora, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]  # it learns (the first measurement is after 2 steps)
    assert straight.tokenizer.special_tokens()[IM_END] == tokenizer.vocab_size + 1  # ChatML tokens were added
    import shutil

    shutil.copytree(tmp_path / "straight" / "ckpt-2", tmp_path / "halves" / "ckpt-2")  # as if stopped at step 2
    model, tokenizer = _char_model()
    resumed = run_sft(model, tokenizer, sft, train, tmp_path / "halves", lora=lora, resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    if lora is not None:  # only adapters and the chat-token rows changed
        base = _char_model()[0]
        grown = prepare_chat_model(base, train_tokenizer([LETTERS], kind="char"))[0]
        from custom_llm.model.lora import base_state_dict

        for name, tensor in base_state_dict(straight.model).items():
            expected = grown.state_dict()[name]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)


def test_finetune_command_lora_then_chat_and_export(tmp_path, capsys, monkeypatch):
    import io

    from custom_llm.checkpoint_io import save_model
    from custom_llm.cli import main

    model, tokenizer = _char_model()
    save_model(model, tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    path = _conversations(tmp_path / "c.jsonl", n=8)
    common = ["--init", str(tmp_path / "base"), "--data", path, "--device", "cpu", "--precision", "fp32",
              "--no-progress", "--train.batch_size", "4", "--samples", "1"]
    assert main(["finetune", *common, "--out", str(tmp_path / "sft"), "--max-steps", "2", "--no-packing",
                 "--lora.r", "4", "--lora.targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "Q: Say apple" in out and "custom-llm chat --ckpt" in out
    final = tmp_path / "sft" / "ckpt-2"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    monkeypatch.setattr("sys.stdin", io.StringIO("Say river\n"))
    assert main(["chat", "--ckpt", str(tmp_path / "sft"), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 1
    assert main(["export", "--ckpt", str(tmp_path / "sft"), "--out", str(tmp_path / "hf"), "--merge-lora"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["finetune", *common, "--out", str(tmp_path / "bad"), "--lora.targets", "embed"]) == 2
    assert main(["finetune", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    (tmp_path / "junk.jsonl").write_text("not json\n{\"messages\": []}\n")
    assert main(["finetune", *common[:2], "--data", str(tmp_path / "junk.jsonl"), "--out", str(tmp_path / "bad")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [e.split(":")[0] for e in errors] == ["error"] * 3
    assert "lora.targets" in errors[0] and "not found" in errors[1]
    assert "no valid conversation" in errors[2] and "lines 1" in errors[2] and "lines 2" in errors[2]


def test_accumulation_weighs_every_learned_token_equally(tmp_path):
    """Rows hold different numbers of answer tokens: 2 micro-batches of 2 must train like 1 batch of 4."""
    path = _conversations(tmp_path / "c.jsonl", n=12)
    sft = SFTConfig(data=path, packing=False)
    results = []
    for k in (1, 2):
        model, tokenizer = _char_model()
        train = dict(RUN, max_steps=2, eval_every=2, lr=3e-3, grad_accum_steps=k, keep_checkpoints=1)
        results.append(run_sft(model, tokenizer, sft, train, tmp_path / f"k{k}", progress=False).model)
    losses = [[json.loads(line).get("loss") for line in open(tmp_path / f"k{k}" / "metrics.jsonl")] for k in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # fp32 round-off, magnified by Adam's first steps, stays near 1e-5; a mean per micro-batch is off by ~1e-2
    for (name, a), (_, b) in zip(results[0].state_dict().items(), results[1].state_dict().items()):
        assert float((a - b).abs().max()) < 1e-4, name


SFT_JOB = '''
import sys
sys.path.insert(0, sys.argv[3])
import test_sft as t
from custom_llm.model.lora import LoRAConfig
from custom_llm.training.sft import SFTConfig, run_sft

model, tokenizer = t._char_model()
train = dict(t.RUN, max_steps=3, eval_every=3, lr=3e-3, sample_tokens=0)
run_sft(model, tokenizer, SFTConfig(data=sys.argv[2]), train, sys.argv[1], lora=LoRAConfig(r=4), progress=False)
'''


@pytest.mark.slow
def test_two_gloo_ranks_fine_tune_like_one_process(tmp_path):
    """DDP under torchrun (LoRA, packed rows) gives the losses and weights of one process with the same batch."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(SFT_JOB)
    data = _conversations(tmp_path / "c.jsonl", n=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), data, here], check=True, timeout=300,
                   env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "ddp"), data, here], check=True, timeout=300, env=env)
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("single", "ddp")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    single, ddp = (load_file(str(tmp_path / d / "ckpt-3" / "model.safetensors")) for d in ("single", "ddp"))
    for name in single:
        assert float((single[name] - ddp[name]).abs().max()) < 1e-4, name
