"""The continuous-batching engine: equal to the single-request engine and the no-cache reference,
seeded requests independent of their neighbours, slots freed on every way a request can end."""

import threading
import time

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.generation import Engine, SamplingParams, generate_without_cache
from custom_llm.generation.batch import BatchEngine, GenerationRequest, QueueFull
from custom_llm.generation.sampling import apply_presence_frequency_penalty, process_logits, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [4], [9, 9, 9, 9, 9], [30, 31], [7] * 20]


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
              tie_embeddings=False, init_std=0.2)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


@pytest.mark.parametrize("windows", [{}, {"sliding_window": 6, "window_pattern": "SL"}, {"sliding_window": 5}],
                         ids=["full", "window+full", "all-window"])
def test_greedy_batch_equals_reference_and_engine(windows):
    model = tiny_model(**windows)
    ref = [generate_without_cache(model, p, 24) for p in PROMPTS]
    engine_out = [Engine(model, compile=False).generate([p], 24)[0] for p in PROMPTS]
    assert engine_out == ref
    batched = BatchEngine(model, max_batch=4).generate_batch(PROMPTS, 24)  # 6 prompts through 4 slots
    assert batched == ref


def test_seeded_sampling_is_the_same_alone_and_beside_seven_others():
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    alone = BatchEngine(model, max_batch=1).generate_batch([PROMPTS[1]], 30, params, seeds=[1234])[0]
    reference = Engine(model, compile=False).generate([PROMPTS[1]], 30, params, torch.Generator().manual_seed(1234))[0]
    assert alone == reference
    others = [PROMPTS[i % len(PROMPTS)] for i in range(7)]
    mixed = [SamplingParams(temperature=0.7 + 0.1 * i) for i in range(7)]
    out = BatchEngine(model, max_batch=8).generate_batch([*others[:3], PROMPTS[1], *others[3:]], 30,
                                                         [*mixed[:3], params, *mixed[3:]],
                                                         seeds=[None, 1, 2, 1234, 3, None, 4, 5])
    assert out[3] == alone
    assert len({tuple(o) for o in out}) > 1  # the neighbours really sampled something else


def test_stop_ids_callbacks_and_finish_reasons():
    model = tiny_model()
    engine = BatchEngine(model, max_batch=2)
    greedy = generate_without_cache(model, PROMPTS[0], 12)
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    seen, finished = [], []
    r1 = engine.submit(GenerationRequest(PROMPTS[0], 12, stop_ids=[stop_at], on_finish=finished.append))
    r2 = engine.submit(GenerationRequest(PROMPTS[0], 12, on_token=lambda s: seen.append(s.token) or len(seen) < 3))
    r3 = engine.submit(GenerationRequest(PROMPTS[0], 4))
    while engine.step():
        pass
    assert r1.tokens == greedy[:first] and r1.finish_reason == "stop" and finished == [r1]
    assert r2.tokens == greedy[:3] == seen and r2.finish_reason == "stop"
    assert r3.tokens == greedy[:4] and r3.finish_reason == "length"
    assert engine.active_slots == 0 and engine.queue_depth == 0


def test_cancel_frees_the_slot_and_queue_bound():
    model = tiny_model()
    engine = BatchEngine(model, max_batch=1, max_queue=1)
    running = engine.submit(GenerationRequest(PROMPTS[0], 50))
    engine.step()
    assert engine.active_slots == 1
    waiting = engine.submit(GenerationRequest(PROMPTS[1], 5))
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest(PROMPTS[2], 5))
    engine.cancel(running)
    engine.step()  # the cancelled slot is freed and the waiting request admitted in the same step
    assert running.finish_reason == "cancelled" and running.done.is_set()
    assert engine.slots[0] is not None and engine.slots[0].request is waiting
    while engine.step():
        pass
    assert waiting.tokens == generate_without_cache(model, PROMPTS[1], 5)
    queued = engine.submit(GenerationRequest(PROMPTS[1], 5))
    engine.cancel(queued)  # cancelled while queued: finished at once, never admitted
    assert queued.finish_reason == "cancelled" and engine.queue_depth == 0


def test_context_limit_is_checked():
    engine = BatchEngine(tiny_model(max_seq_len=16), max_batch=1)
    with pytest.raises(ValueError, match="context"):
        engine.submit(GenerationRequest(list(range(10)), 7))
    engine.submit(GenerationRequest(list(range(10)), 6))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(GenerationRequest([], 6))


def test_background_thread_serves_concurrent_callers():
    model = tiny_model()
    ref = [generate_without_cache(model, p, 10) for p in PROMPTS]
    engine = BatchEngine(model, max_batch=3).start()
    try:
        results = {}

        def call(i):
            results[i] = engine.generate_batch([PROMPTS[i]], 10)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert [results[i] for i in range(len(PROMPTS))] == ref
        deadline = time.time() + 5
        while engine.active_slots and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active_slots == 0
    finally:
        engine.stop()


def test_presence_frequency_penalty_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]]))
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=0.0)
    assert process_logits(logits, params, counts=torch.tensor([[0.0, 0.0, 0.0, 1.0]])).argmax().item() == 2
    with pytest.raises(Exception, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_frequency_penalty_changes_greedy_output_like_a_naive_loop():
    model = tiny_model()
    params = SamplingParams(frequency_penalty=1.5, presence_penalty=0.3)
    ids = list(PROMPTS[3])
    counts = torch.zeros(1, VOCAB)
    with torch.no_grad():
        for _ in range(15):
            logits = model(torch.tensor([ids]))[:, -1]
            token = int(process_logits(logits, params, counts=counts).argmax())
            counts[0, token] += 1
            ids.append(token)
    out = BatchEngine(model, max_batch=2).generate_batch([PROMPTS[3], PROMPTS[0]], 15, params)
    assert out[0] == ids[len(PROMPTS[3]):]


def test_logprobs_match_log_softmax():
    model = tiny_model()
    engine = BatchEngine(model, max_batch=2)
    steps = []
    request = engine.submit(GenerationRequest(PROMPTS[0], 3, logprobs=4, on_token=steps.append))
    while engine.step():
        pass
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + request.tokens]))[0, len(PROMPTS[0]) - 1:-1]  # (3, V)
    expected = torch.log_softmax(logits, dim=-1)
    for i, step in enumerate(steps):
        assert step.logprob == pytest.approx(expected[i, step.token].item(), abs=1e-4)
        assert [t for t, _ in step.top_logprobs] == expected[i].topk(4).indices.tolist()
        assert step.top_logprobs[0][0] == step.token  # greedy picks the most likely
    chosen, values, ids = token_logprobs(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 1)
    assert chosen.item() == pytest.approx(-1.3132617) and ids.tolist() == [[1]]


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None and __import__("shutil").which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_batched_step_equals_reference_on_cpu():
    """The compiled step (all slots, whole cache read, inductor C++) gives the reference's greedy tokens."""
    model = tiny_model(sliding_window=6, window_pattern="SL")
    ref = [generate_without_cache(model, p, 20) for p in PROMPTS]
    engine = BatchEngine(model, max_batch=4, compile=True)
    assert engine.generate_batch(PROMPTS, 20) == ref
    assert engine._step is not None  # compiled, not the eager fallback


def test_worker_survives_a_failing_step():
    """A bug inside a step fails the requests in the slots; the thread keeps serving the next ones."""
    model = tiny_model()
    engine = BatchEngine(model, max_batch=2)
    real_emit = engine._emit
    engine._emit = lambda b, logits: (_ for _ in ()).throw(RuntimeError("boom"))  # fails outside the guarded parts
    engine.start()
    try:
        failed = engine.submit(GenerationRequest(PROMPTS[0], 5))
        assert failed.done.wait(10) and failed.finish_reason == "error"
        engine._emit = real_emit
        assert engine.generate_batch([PROMPTS[1]], 5) == [generate_without_cache(model, PROMPTS[1], 5)]
    finally:
        engine.stop()
