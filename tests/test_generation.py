"""The generation engine: cached decoding equals full forwards; greedy equals an argmax loop and HF generate."""

import importlib
import os
import shutil

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.generation import (Engine, KVCache, SamplingParams, decode_one_token, generate,
                                   generate_without_cache, prefill, sample)

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides) -> Transformer:
    kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
              tie_embeddings=False, init_std=0.1)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


def cached_logits(model, rows, prompt_lens):
    """Teacher-forced cached decoding: prefill each row's prompt (left-padded), then feed the rest of
    the row one token at a time. Returns, per row, logits (N_b - P_b + 1, V) for times P_b - 1 ..."""
    B = len(rows)
    P = max(prompt_lens)
    pad = torch.tensor([P - p for p in prompt_lens])
    steps = max(len(r) - p for r, p in zip(rows, prompt_lens))
    cache = KVCache.for_model(model, B, P + steps)
    cache.reset(pad)
    tokens = torch.zeros(B, P, dtype=torch.long)
    for b, (r, p) in enumerate(zip(rows, prompt_lens)):
        tokens[b, P - p:] = torch.tensor(r[:p])
    out = [[] for _ in rows]
    with torch.no_grad():
        logits = prefill(model, cache, tokens)
        for s in range(steps):
            for b in range(B):
                out[b].append(logits[b])
            nxt = torch.tensor([[r[p + s] if p + s < len(r) else 0] for r, p in zip(rows, prompt_lens)])
            logits = decode_one_token(model, cache, nxt, torch.tensor([P + s]), read_len=P + s + 1)
        for b in range(B):
            out[b].append(logits[b])
    return [torch.stack(o[: len(r) - p + 1]) for o, r, p in zip(out, rows, prompt_lens)]


def assert_cached_equals_full(model, rows, prompt_lens):
    got = cached_logits(model, rows, prompt_lens)
    with torch.no_grad():
        for g, r, p in zip(got, rows, prompt_lens):
            full = model(torch.tensor([r]))[0]  # (N, V)
            torch.testing.assert_close(g, full[p - 1:], atol=1e-5, rtol=0)


CONFIGS = {
    "dense_mha": dict(n_kv_heads=4),
    "gqa": dict(),
    "mqa_eager": dict(n_kv_heads=1, attn_backend="eager"),
    "window": dict(sliding_window=4),
    "window_SL": dict(sliding_window=5, window_pattern="SL", n_layers=4),
    "moe": dict(n_experts=4, moe_top_k=2, moe_ffn_dim=48),
    "rezero_bias": dict(rezero=True, attn_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
    model = tiny_model(**CONFIGS[name])
    if name == "rezero_bias":  # ReZero scales start at 0 (identity blocks): give them a value
        with torch.no_grad():
            for block in model.layers:
                block.attn_scale.fill_(0.7)
                block.mlp_scale.fill_(1.3)
    rows = [torch.randint(0, VOCAB, (23,)).tolist(), torch.randint(0, VOCAB, (17,)).tolist()]
    assert_cached_equals_full(model, rows, prompt_lens=[3, 9])  # 20 decode steps: far past the window


@pytest.mark.parametrize("prompt_len", [1, 4, 11])
def test_window_prefill_longer_than_window(prompt_len):
    model = tiny_model(sliding_window=4, window_pattern="SL")
    rows = [torch.randint(0, VOCAB, (prompt_len + 9,)).tolist()]
    assert_cached_equals_full(model, rows, prompt_lens=[prompt_len])


def test_window_matters_in_cached_decoding():
    """The test above can fail: the same weights without the window give different logits past W."""
    windowed = tiny_model(sliding_window=4)
    full = tiny_model()
    full.load_state_dict(windowed.state_dict())
    rows = [torch.randint(0, VOCAB, (16,)).tolist()]
    a, b = cached_logits(windowed, rows, [2])[0], cached_logits(full, rows, [2])[0]
    assert (a[-1] - b[-1]).abs().max() > 1e-3


def test_sliding_window_memory_is_bounded():
    model = tiny_model(sliding_window=4, window_pattern="SL", n_layers=4)
    engine = Engine(model, compile=False)
    engine.generate([[1, 2, 3]], max_new_tokens=40)
    assert engine.cache.memory_slots() == [4, 43, 4, 43]
    assert [k.shape for k in engine.cache.keys][0] == (1, 2, 4, 8)  # (B, K kv heads, W, D)
    engine.generate([[1, 2, 3]], max_new_tokens=200)
    assert engine.cache.memory_slots() == [4, 203, 4, 203]


def test_all_window_model_reuses_cache_for_any_length():
    """Without full-attention layers the cache has no length limit (and a short run stores the
    never-binding window as full slots)."""
    model = tiny_model(sliding_window=8)
    engine = Engine(model, compile=False)
    engine.generate([[1, 2]], 3)
    assert engine.cache.memory_slots() == [5, 5]  # shorter than the window: plain full buffers
    long = engine.generate([[1, 2]], 30)
    assert engine.cache.memory_slots() == [8, 8]
    assert long[0] == generate_without_cache(model, [1, 2], 30)
    cache = engine.cache
    assert engine.generate([[1, 2]], 60)[0] == generate_without_cache(model, [1, 2], 60)
    assert engine.cache is cache


def test_greedy_equals_full_forward_argmax_loop():
    model = tiny_model(sliding_window=6, window_pattern="SL")
    prompt = torch.randint(0, VOCAB, (5,)).tolist()
    expected = generate_without_cache(model, prompt, 30)
    assert generate(model, [prompt], 30)[0] == expected
    assert len(set(expected)) > 3  # a degenerate model (one repeated token) would prove little


def test_batched_prompts_of_different_lengths():
    """Each row of a left-padded batch generates what it would alone (no NaN from padding rows)."""
    model = tiny_model(sliding_window=4, window_pattern="SL")
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (1, 7, 3)]
    batched = generate(model, prompts, 12)
    for prompt, row in zip(prompts, batched):
        assert row == generate_without_cache(model, prompt, 12)


def test_sampling_reproducible_and_matches_reference():
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    prompt = [3, 1, 4, 1, 5]
    a = generate(model, [prompt], 25, params, torch.Generator().manual_seed(7))
    b = generate(model, [prompt], 25, params, torch.Generator().manual_seed(7))
    c = generate(model, [prompt], 25, params, torch.Generator().manual_seed(8))
    ref = generate_without_cache(model, prompt, 25, params, torch.Generator().manual_seed(7))
    assert a == b and a[0] == ref
    assert a != c


def test_eos_stops_and_max_new_tokens():
    model = tiny_model()
    prompt = [5, 6, 7]
    free = generate(model, [prompt], 20)[0]
    assert len(free) == 20
    eos = free[6]
    first = free.index(eos)
    assert generate(model, [prompt], 20, eos_ids=[eos])[0] == free[:first]
    assert generate(model, [prompt, prompt[:1]], 20, eos_ids=[eos])[0] == free[:first]


def test_engine_reuses_cache_across_calls():
    model = tiny_model(sliding_window=4, window_pattern="SL")
    engine = Engine(model, compile=False)
    first = engine.generate([[1, 2, 3, 4, 5, 6]], 10)
    cache = engine.cache
    assert engine.generate([[9]], 5)[0] == generate_without_cache(model, [9], 5)  # stale keys invisible
    assert engine.cache is cache
    assert engine.generate([[1, 2, 3, 4, 5, 6]], 10) == first


def test_decode_step_traces_without_graph_breaks():
    """The static-shape decode step (what CUDA compiles) is one graph and gives the eager logits."""
    model = tiny_model(sliding_window=4, window_pattern="SL")
    cache = KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        prefill(model, cache, torch.tensor([[1, 2, 3, 4, 5]]))
        step = torch.compile(decode_one_token, backend="eager", fullgraph=True, dynamic=False)
        token = torch.tensor([[7]])
        eager = decode_one_token(model, cache, token, torch.tensor([5]), read_len=6)
        compiled = step(model, cache, token, torch.tensor([5]))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
GENERATE_MODULE = importlib.import_module("custom_llm.generation.generate")  # the module, not the function


@pytest.fixture(scope="module")
def compiled_cpu_engine():
    """One real CPU compile (inductor C++, weights frozen into its GEMM template) shared by the tests
    below: a model with every decode-time feature that changes the compiled graph (a sliding-window
    and a full layer, MoE experts with a gated shared expert), and its eager tokens for two prompts."""
    if not HAS_CXX:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    torch.manual_seed(0)
    model = tiny_model(sliding_window=4, window_pattern="SL", n_experts=4, moe_top_k=2, moe_ffn_dim=24,
                       n_shared_experts=1, shared_expert_gate=True)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9)]
    eager = Engine(model, compile=False)
    torch._dynamo.reset()
    engine = Engine(model, compile=True)
    compiled = engine.generate(prompts, 8)
    yield engine, eager, prompts, compiled
    torch._dynamo.reset()


def test_compiled_cpu_decode_matches_eager(compiled_cpu_engine):
    """The compiled step gives the eager tokens (the MoE layers' static 'gathered' dispatch included)."""
    engine, eager, prompts, compiled = compiled_cpu_engine
    assert compiled == eager.generate(prompts, 8)
    assert engine.step.state == "compiled"  # it really ran compiled
    assert engine.step.skip_guards  # no step needed a new graph (MoE: no recompilation per routing)


def test_compiled_cpu_decode_replays_with_guards_skipped(compiled_cpu_engine):
    """New prompts of the same batch bucket replay the compiled code, guards skipped after the first step."""
    engine, eager, prompts, _ = compiled_cpu_engine
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    others = [[7, 1], [2, 8, 5, 3, 6, 4, 9, 9, 1, 0, 3]]
    assert engine.generate(others, 8) == eager.generate(others, 8)
    assert engine.generate(prompts[::-1], 8) == eager.generate(prompts[::-1], 8)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs and engine.step.skip_guards


def counting_compiler(monkeypatch, seen_inputs=None):
    """Make the engine compile with a graph-counting backend (no code generation: fast); returns the counter.

    ``seen_inputs`` collects (batch rows, address of layer 0's key buffer) of every compiled call."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(decode_one_token, backend=counter, dynamic=False)

    def step(model, cache, token, time):
        if seen_inputs is not None:
            seen_inputs.add((token.shape[0], cache.keys[0].data_ptr()))
        return compiled(model, cache, token, time)

    monkeypatch.setattr(GENERATE_MODULE, "compile_decode_step", lambda device: step)
    torch._dynamo.reset()
    return counter


def test_alternating_batch_sizes_keep_their_caches_and_graphs(monkeypatch):
    """Batch sizes 1, 2, 1, 2 (a server's pattern) reuse one cache and one graph per bucket: no rebuilt
    cache (CUDA graphs need the same buffers at the same addresses) and no recompilation."""
    seen_inputs = set()
    counter = counting_compiler(monkeypatch, seen_inputs)
    model = tiny_model(sliding_window=4, window_pattern="SL")
    engine, eager = Engine(model, compile=True), Engine(model, compile=False)
    batches = {1: [[5, 6, 7]], 2: [[1, 2, 3, 4], [9]], 3: [[4], [8, 8], [1, 5, 2]], 4: [[3], [1, 4], [1, 5], [9, 2, 6]]}
    try:
        caches = {}
        for size in (1, 2, 1, 2):
            assert engine.generate(batches[size], 6) == eager.generate(batches[size], 6)
            caches.setdefault(size, engine.cache)
            assert engine.cache is caches[size]
        assert counter.frame_count == 2 and sorted(engine.caches) == [1, 2]
        assert len(seen_inputs) == 2  # one key buffer per bucket, at one address
        for size in (3, 4, 3):  # 3 rows run in the bucket of 4 (a dummy row), 4 rows too
            assert engine.generate(batches[size], 6) == eager.generate(batches[size], 6)
        assert counter.frame_count == 3 and sorted(engine.caches) == [1, 2, 4] and len(seen_inputs) == 3
        assert engine.step.skip_guards
    finally:
        torch._dynamo.reset()


def test_batch_buckets():
    from custom_llm.generation.generate import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65, 128, 130)] == \
        [1, 2, 4, 4, 8, 8, 16, 64, 64, 128, 128, 192]


def test_dummy_rows_leave_sampling_of_the_real_rows_alone():
    """Three prompts run in a bucket of four; the dummy row draws no random numbers, so the sampled tokens
    are those of a full-forward loop that samples exactly the three rows from the same generator."""
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=20)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # equal lengths: the batch needs no left padding
    got = generate(model, prompts, 10, params, torch.Generator().manual_seed(3))
    ids, generator = torch.tensor(prompts), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(10):
            token = sample(model(ids)[:, -1], params, generator)  # (3,): exactly the real rows' draws
            ids = torch.cat((ids, token.unsqueeze(1)), dim=1)
    assert got == ids[:, 3:].tolist()


def test_failed_compile_warns_and_decodes_eagerly(monkeypatch, caplog):
    def broken_compiler(device):
        def step(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler\n\nSet TORCHDYNAMO_VERBOSE=1 for ...")
        return step

    monkeypatch.setattr(GENERATE_MODULE, "compile_decode_step", broken_compiler)
    model = tiny_model()
    expected = Engine(model, compile=False).generate([[1, 2, 3]], 8)
    engine = Engine(model, compile=True)
    with caplog.at_level("WARNING"):
        assert engine.generate([[1, 2, 3]], 8) == expected
        assert engine.generate([[1, 2, 3]], 8) == expected
    assert caplog.text.count("compiling the decode step failed (RuntimeError: InvalidCxxCompiler: no working "
                             "C++ compiler); decoding eagerly") == 1  # once, first line only
    assert engine.step.state == "eager"


def fake_compiler(monkeypatch, fails):
    """A step that raises a RuntimeError with a message unlike torch's where ``fails(calls)`` is true;
    ``calls`` (returned) holds whether guards were skipped, per call so far."""
    calls = []

    def compiler(device):
        def step(model, cache, token, time):
            calls.append(torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe)
            if fails(calls):
                raise RuntimeError("some failure")
            return decode_one_token(model, cache, token, time, read_len=int(time) + 1)
        return step

    monkeypatch.setattr(GENERATE_MODULE, "compile_decode_step", compiler)
    return calls


def test_a_recompile_mid_generation_turns_the_guard_skip_off(monkeypatch):
    """A step that fails with guards skipped (torch raises when it would need a new graph then) is retried
    with guards; once that works, guards stay on, and the tokens stay right. The error's text plays no part."""
    calls = fake_compiler(monkeypatch, lambda calls: len(calls) == 3 and calls[-1])
    model = tiny_model()
    expected = Engine(model, compile=False).generate([[1, 2, 3]], 8)
    engine = Engine(model, compile=True)
    assert engine.generate([[1, 2, 3]], 8) == expected
    assert calls == [False, True, True, False, False, False, False, False]  # first step checks; retry and after: checks
    assert engine.step.state == "compiled" and not engine.step.skip_guards


def test_a_real_error_with_guards_skipped_is_raised(monkeypatch):
    """An error that the retry with guards repeats is no guard problem: it propagates."""
    calls = fake_compiler(monkeypatch, lambda calls: len(calls) >= 3)
    engine = Engine(tiny_model(), compile=True)
    with pytest.raises(RuntimeError, match="some failure"):
        engine.generate([[1, 2, 3]], 8)
    assert calls == [False, True, True, False]


def test_hf_llama_greedy_generate_token_for_token():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500.0,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    ours = Transformer(ModelConfig(vocab_size=96, d_model=64, ffn_dim=160, n_layers=3, n_heads=4, n_kv_heads=2,
                                   head_dim=16, max_seq_len=128, norm_eps=1e-6, rope_theta=500.0,
                                   tie_embeddings=False)).eval()
    missing, unexpected = ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()},
                                               strict=False)
    assert not missing and not unexpected
    prompt = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                               min_new_tokens=40)[0, 7:].tolist()
    got = generate(ours, [prompt[0].tolist()], 40)[0]
    assert got == expected
    assert len(set(expected)) > 5


def test_transposed_weight_storage_keeps_values_and_output():
    """The CPU decode layout changes memory order only: same parameters, same tokens, same checkpoint."""
    import copy

    from custom_llm.checkpoint_io import model_state_for_saving

    model = tiny_model(attn_bias=True)
    plain = copy.deepcopy(model)
    engine = Engine(model, prepare_model=True)  # on the CPU, not compiling: weights stored transposed
    q = model.layers[0].self_attn.q_proj.weight
    assert q.stride() == (1, q.shape[0]) and q.t().is_contiguous()
    assert model.lm_head.weight.t().is_contiguous()
    saved, reference = model_state_for_saving(model), model_state_for_saving(plain)
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) and saved[k].is_contiguous() for k in saved)
    prompt = [3, 1, 4, 1, 5, 9]
    assert engine.generate([prompt], 20) == Engine(plain).generate([prompt], 20)
    assert not plain.lm_head.weight.t().is_contiguous()  # the default left the model alone


def test_engine_leaves_the_model_alone_unless_asked():
    """By default the engine neither re-lays out weights nor switches modes: a training-mode model is an
    error (it would decode with dropout); prepare_model=True is the explicit way to do both in place."""
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, dropout=0.1))
    strides = [p.stride() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"eval mode.*model.eval\(\)"):
        Engine(model)
    assert model.training and [p.stride() for p in model.parameters()] == strides
    Engine(model, prepare_model=True)
    assert not model.training and [p.stride() for p in model.parameters()] != strides


def test_one_shot_generate_runs_in_eval_mode_and_restores_the_mode():
    model = tiny_model(dropout=0.5).train()
    strides = [p.stride() for p in model.parameters()]
    got = generate(model, [[1, 2, 3]], 10)
    assert model.training and [p.stride() for p in model.parameters()] == strides
    assert got[0] == generate_without_cache(model.eval(), [1, 2, 3], 10)


def test_decode_precision_is_scoped_to_fp32_on_cuda():
    """TF32 matmuls ("high") inside the context for fp32 on CUDA only; the caller's setting afterwards.
    (The setting itself needs no GPU, so this runs anywhere.)"""
    from custom_llm.generation.decode_step import decode_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with decode_precision(torch.device("cuda"), torch.float32):
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "highest"
        for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
            with decode_precision(torch.device(device), dtype):
                assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_engine_sets_decode_precision_only_while_it_runs(monkeypatch):
    """The forward passes run under the engine's precision; between tokens the caller's setting holds.
    On the CPU the engine is told its device is CUDA for the precision choice only."""
    from custom_llm.generation import decode_step

    monkeypatch.setattr(GENERATE_MODULE, "decode_precision",
                        lambda device, dtype: decode_step.decode_precision(torch.device("cuda"), dtype))
    model = tiny_model()
    inside = []
    model.register_forward_hook(lambda *_: inside.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        between = [torch.get_float32_matmul_precision() for _ in Engine(model).stream([[1, 2]], 5)]
    finally:
        torch.set_float32_matmul_precision(before)
    assert inside == ["high"] * 5 and between == ["highest"] * 5


@pytest.mark.cuda
def test_compiled_cuda_decode_matches_eager():
    torch.manual_seed(0)
    model = tiny_model(sliding_window=8, window_pattern="SL", n_layers=4).cuda()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 12)]
    eager = Engine(model, compile=False).generate(prompts, 40)
    engine = Engine(model, compile=True)
    assert engine.generate(prompts, 40) == eager
    assert engine.generate(prompts, 40) == eager  # replayed graphs, reused cache


@pytest.mark.cuda
def test_compiled_cuda_decode_alternating_batch_sizes_records_no_new_graphs():
    """Batch sizes 1, 2, 1, 2: after the first 1 and 2, no new dynamo graph and no new CUDA graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = tiny_model(sliding_window=8, window_pattern="SL", n_layers=4).cuda()
    batches = {1: [[5, 6, 7]], 2: [[1, 2, 3, 4], [9]]}
    eager = Engine(model, compile=False)
    torch._dynamo.reset()
    engine = Engine(model, compile=True)
    try:
        for size in (1, 2):
            assert engine.generate(batches[size], 12) == eager.generate(batches[size], 12)
        graphs, recorded = counters["stats"]["unique_graphs"], dict(counters["inductor"])
        for size in (1, 2, 1, 2):
            assert engine.generate(batches[size], 12) == eager.generate(batches[size], 12)
        assert counters["stats"]["unique_graphs"] == graphs and dict(counters["inductor"]) == recorded
        assert not counters["inductor"]["cudagraph_skips"] and engine.step.skip_guards
    finally:
        torch._dynamo.reset()
