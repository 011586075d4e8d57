"""Features together, not one at a time: a covering set of runs with many features on at once.

Every pair of features is on together in at least one run (checked by ``test_runs_cover_every_pair``),
and each run trains a few steps, saves, resumes to the same weights as an uninterrupted run, generates
with the KV cache exactly as the cache-free forward does, and exports to Hugging Face where the
combination is representable (the same logits in transformers) or is refused with a message naming the
reason. Combinations the code does not support are refused by the config, and the messages are checked.
"""

import itertools
import json
import types

import numpy as np
import pytest
import torch

from custom_llm import ModelConfig
from custom_llm.errors import ConfigError, UserError
from custom_llm.generation import generate, generate_without_cache
from custom_llm.training.config import TrainConfig
from custom_llm.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# Each feature: (model fields, train fields). Features that need experts list "moe" among their runs' features.
FEATURES = {
    "moe": (dict(n_experts=4, moe_top_k=2, moe_ffn_dim=32), {}),
    "shared_expert": (dict(n_shared_experts=1, shared_expert_gate=True), {}),
    "noisy_gating": (dict(moe_noisy_gating=True), {}),
    "layerdrop": (dict(layerdrop=0.3), {}),
    "rezero": (dict(rezero=True), {}),
    "window_pattern": (dict(sliding_window=6, window_pattern="SL"), {}),
    "mqa": (dict(n_kv_heads=1), {}),
    "grad_checkpointing": (dict(grad_checkpointing=True), {}),
    "flex": (dict(attn_backend="flex"), {}),
    "eager_attention": (dict(attn_backend="eager"), {}),
    "dropout": (dict(dropout=0.1), {}),
    "untied": (dict(tie_embeddings=False), {}),
    "qkv_bias": (dict(attn_bias=True), {}),
    "grad_accum": ({}, dict(grad_accum_steps=2)),
    "lion": ({}, dict(optimizer="lion", lr=3e-3)),
    "muon": ({}, dict(optimizer="muon")),
    "curriculum": ({}, dict(curriculum=[dict(seq_len=8, batch_size=4, max_steps=2), dict(seq_len=16, batch_size=8)])),
    "compile": ({}, dict(compile=True)),
    "bf16": ({}, dict(precision="bf16")),  # CPU autocast: bf16 matmuls, fp32 attention (the default on AMX CPUs)
}
NEEDS = {"shared_expert": "moe", "noisy_gating": "moe"}
EXCLUSIVE = [{"flex", "eager_attention"}, {"lion", "muon"}]
UNSUPPORTED = {frozenset({"flex", "dropout"}): "attn_backend 'flex' does not support attention dropout"}

# A covering set: every allowed pair is on together in at least one run (sdpa and GQA are the defaults).
RUNS = [
    {"moe", "shared_expert", "layerdrop", "window_pattern", "grad_checkpointing", "dropout", "qkv_bias", "grad_accum",
     "lion", "eager_attention"},
    {"moe", "noisy_gating", "rezero", "mqa", "flex", "untied", "curriculum", "muon", "grad_checkpointing", "bf16"},
    {"layerdrop", "rezero", "mqa", "dropout", "untied", "grad_accum", "curriculum", "eager_attention", "qkv_bias"},
    {"moe", "shared_expert", "noisy_gating", "window_pattern", "flex", "qkv_bias", "grad_accum", "curriculum",
     "untied", "layerdrop"},
    {"window_pattern", "mqa", "grad_checkpointing", "dropout", "lion", "curriculum", "rezero", "shared_expert",
     "moe", "grad_accum"},
    {"muon", "dropout", "window_pattern", "eager_attention", "untied", "noisy_gating", "moe", "qkv_bias",
     "grad_checkpointing"},
    {"layerdrop", "grad_accum", "muon", "flex", "mqa", "qkv_bias", "rezero", "window_pattern"},
    {"layerdrop", "lion", "flex", "untied", "noisy_gating", "moe", "rezero", "mqa", "grad_checkpointing"},
    {"lion", "rezero", "qkv_bias", "eager_attention", "shared_expert", "moe", "noisy_gating", "curriculum",
     "layerdrop", "mqa"},
    {"muon", "curriculum", "grad_checkpointing", "layerdrop", "shared_expert", "moe", "dropout", "mqa"},
    {"lion", "untied", "grad_checkpointing", "window_pattern", "layerdrop", "grad_accum", "eager_attention"},
    {"muon", "grad_accum", "untied", "shared_expert", "moe", "rezero", "eager_attention", "mqa"},
    {"muon", "untied", "qkv_bias", "dropout", "curriculum", "window_pattern", "noisy_gating", "moe", "grad_accum"},
    {"compile", "moe", "shared_expert", "noisy_gating", "layerdrop", "window_pattern", "mqa", "rezero", "dropout",
     "untied", "qkv_bias", "grad_accum", "lion", "curriculum", "grad_checkpointing", "eager_attention", "bf16"},
    {"compile", "flex", "muon", "bf16"},
]


def _exclusive(a: str, b: str) -> bool:
    return any({a, b} <= group for group in EXCLUSIVE)


def test_runs_cover_every_pair():
    """The covering property itself, so a new feature that no run switches on fails here."""
    for run in RUNS:
        assert run <= FEATURES.keys(), run - FEATURES.keys()
        for feature, needed in NEEDS.items():
            assert feature not in run or needed in run, (run, feature)
        for a, b in itertools.combinations(run, 2):
            assert not _exclusive(a, b) and frozenset({a, b}) not in UNSUPPORTED, (a, b)
    missing = [(a, b) for a, b in itertools.combinations(sorted(FEATURES), 2)
               if not _exclusive(a, b) and frozenset({a, b}) not in UNSUPPORTED
               and not any({a, b} <= run for run in RUNS)]
    assert missing == []


@pytest.mark.parametrize("pair", sorted(UNSUPPORTED, key=sorted))
def test_unsupported_pairs_are_refused_up_front(pair):
    model, _ = _configs(set(pair))
    with pytest.raises(ConfigError, match=UNSUPPORTED[pair]):
        ModelConfig(**model)


def _configs(features: set[str]) -> tuple[dict, dict]:
    model = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    training = dict(max_steps=4, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0, eval_batches=1,
                    eval_batch_size=4, log_every=1, device="cpu", precision="fp32", sample_tokens=0, save_every=2,
                    keep_checkpoints=5)
    for name in sorted(features):
        model.update(FEATURES[name][0])
        training.update(FEATURES[name][1])
    return model, training


def _dataset(n=3000):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 64, size=23)
    tokens = np.concatenate([np.roll(base, i) for i in range(n // 23 + 1)])[:n].astype(np.uint16)
    return types.SimpleNamespace(train=tokens[: n * 9 // 10], val=tokens[n * 9 // 10:])


def _can_compile() -> bool:
    from custom_llm.training.compiling import compile_toolchain_problem

    return compile_toolchain_problem(torch.device("cpu")) is None


def _marks(run: set) -> list:
    """Compiled runs take minutes of inductor compilation on 2 cores: the slow suite (`.ci/run` runs it)."""
    return [pytest.mark.slow] if "compile" in run else []


@pytest.mark.parametrize("features", [pytest.param(run, marks=_marks(run)) for run in RUNS],
                         ids=lambda run: "+".join(sorted(run)))
def test_features_together_train_resume_generate_export(features, tmp_path):
    if "compile" in features and not _can_compile():
        pytest.skip("torch.compile has no C++ toolchain on this machine")
    from custom_llm.checkpoint_io import load_checkpoint_model, resolve_checkpoint_dir
    from custom_llm.interop.hf import export_hf

    model_fields, train_fields = _configs(features)
    mc, data = ModelConfig(**model_fields), _dataset()
    straight = train(mc, TrainConfig(**train_fields), tmp_path / "straight", data, progress=False)
    assert straight.step == 4 and straight.stopped == "done"
    state = json.loads((resolve_checkpoint_dir(tmp_path / "straight") / "trainer_state.json").read_text())
    assert state["precision"] == ("bf16" if "bf16" in features else "fp32")
    train(mc, TrainConfig(**{**train_fields, "max_steps": 2}), tmp_path / "resumed", data, progress=False)
    resumed = train(mc, TrainConfig(**train_fields), tmp_path / "resumed", data, resume=True, progress=False)
    assert resumed.tokens == straight.tokens
    a, b = (load_checkpoint_model(resolve_checkpoint_dir(tmp_path / run)) for run in ("straight", "resumed"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6 if "compile" in features else 0, msg=name)

    prompt = [int(t) for t in data.val[:10]]  # longer than the window: the rolling cache is exercised
    cached = generate(a, [prompt], 8)[0]
    assert cached == generate_without_cache(a, prompt, 8)

    try:
        export_hf(tmp_path / "straight", tmp_path / "hf")
    except UserError as refusal:  # a combination Hugging Face cannot represent: one line saying why
        assert "\n" not in str(refusal) and "cannot" in str(refusal).lower()
        return
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, a(ids), atol=1e-5, rtol=0)
