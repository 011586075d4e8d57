"""The OpenAI-compatible server, started for real on 127.0.0.1 and a free port, driven by the official
``openai`` client (and raw HTTP where the wire format itself is the point)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx2", reason="httpx2 comes with the openai client")
pytest.importorskip("fastapi", reason="serving needs fastapi")

from custom_llm import ModelConfig, Transformer  # noqa: E402
from custom_llm.checkpoint_io import save_model  # noqa: E402
from custom_llm.generation import generate_without_cache  # noqa: E402
from custom_llm.serving import ServerThread, load_served_model  # noqa: E402
from custom_llm.serving.streams import ChoiceStream  # noqa: E402
from custom_llm.tokenizers import train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["Hello world! Héllo wörld, naïve café. Emoji 🙂 and 日本語 text. " * 20,
          "The quick brown fox jumps over the lazy dog. " * 20]
CLI = [sys.executable, "-c", "import sys; from custom_llm.cli import main; sys.exit(main(sys.argv[1:]))"]
PROMPTS = ["Hello", "The quick", "naïve", "Emoji 🙂", "fox", "world! ", "lazy dog", "café"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint written by the project's own checkpoint code: BPE tokenizer (with chat tokens) + model."""
    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    tokenizer = train_tokenizer(CORPUS, kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=96, init_std=0.3, tie_embeddings=False))
    save_model(model, folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def served(ckpt):
    return load_served_model(str(ckpt), max_batch=8, max_queue=64)


@pytest.fixture(scope="module")
def server(served):
    with ServerThread(served) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(served, ids, n):
    """Greedy tokens of the no-cache reference loop, cut at the first stop id."""
    out = generate_without_cache(served.engine.model, ids, n)
    for i, t in enumerate(out):
        if t in served.stop_ids:
            return out[:i]
    return out


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_models(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    assert models[0].model_extra["context_length"] == 96


def test_greedy_completion_equals_reference_alone_and_in_a_full_batch(client, served):
    refs = {p: reference(served, served.prompt_ids(p), 24) for p in PROMPTS}
    tok = served.tokenizer
    alone = client.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert alone.choices[0].text == tok.decode(refs[PROMPTS[0]])
    assert alone.usage.prompt_tokens == len(served.prompt_ids(PROMPTS[0]))
    assert alone.usage.completion_tokens == len(refs[PROMPTS[0]]) + (alone.choices[0].finish_reason == "stop")
    results = {}

    def call(p):
        results[p] = client.completions.create(model="tiny-chat", prompt=p, max_tokens=24, temperature=0).choices[0].text

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {p: tok.decode(refs[p]) for p in PROMPTS}
    many = client.completions.create(model="tiny-chat", prompt=PROMPTS[:3], max_tokens=24, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3, 4, 5]
    assert [c.text for c in many.choices] == [tok.decode(refs[p]) for p in PROMPTS[:3] for _ in range(2)]


def test_chat_streamed_equals_whole_and_reference(client, served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 🙂"}]
    ref = served.tokenizer.decode(reference(served, served.chat_ids(messages), 30))
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=30,
                                           max_tokens=5, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == ref
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(served.chat_ids(messages))


def test_chat_template_chatml_and_an_hf_folder(served, ckpt, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 🙂"}]
    tok = served.tokenizer
    assert tok.render_chat(messages) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello 🙂<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    im_start, im_end = 4, 5  # the BPE trains the ChatML tokens at ids 4 and 5
    assert served.chat_ids(messages)[0] == im_start  # a special id, from the template
    assert served.stop_ids == {tok.eos_id, im_end}
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    from custom_llm.interop import export_hf

    folder = export_hf(ckpt, tmp_path / "hf", dtype="float32")
    hf_served = load_served_model(str(folder), max_batch=1)
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert hf_served.chat_ids(messages) == list(expected)
    assert hf_served.stop_ids == served.stop_ids


def test_sse_wire_format(server):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["object"] == "chat.completion.chunk" and p["id"] == payloads[0]["id"] for p in payloads)
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length") and payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["total_tokens"] > 0
    assert all(p["usage"] is None for p in payloads[:-1])
    body = {**body, "n": 2, "temperature": 0, "stream_options": None}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as response:
        payloads = [json.loads(e[6:]) for e in response.read().decode().split("\n\n") if e.startswith("data: {")]
    choices = [p["choices"][0] for p in payloads]
    assert [c["index"] for c in choices if c["delta"].get("role")] == [0, 1]  # each choice opens with the role
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1]
    texts = ["".join(c["delta"].get("content") or "" for c in choices if c["index"] == i) for i in (0, 1)]
    assert texts[0] == texts[1]  # greedy: both choices alike


def test_seed_n_and_independence_from_neighbours(client):
    kw = dict(model="tiny-chat", prompt="The quick", max_tokens=20, temperature=1.0, seed=42)
    a = client.completions.create(n=2, **kw)
    assert a.choices[0].text != a.choices[1].text  # choice i uses seed + i
    results = []

    def other(i):
        client.completions.create(model="tiny-chat", prompt=PROMPTS[i], max_tokens=20, temperature=0.9)

    threads = [threading.Thread(target=other, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    results.append(client.completions.create(n=1, **kw))
    for t in threads:
        t.join(60)
    assert results[0].choices[0].text == a.choices[0].text


def test_stop_strings_streamed_and_whole(client, served):
    ref = served.tokenizer.decode(reference(served, served.prompt_ids("Hello"), 30))
    stop = ref[6:9]
    expected = ref[:ref.index(stop)]
    whole = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    parts = [c.choices[0].text for c in client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=30,
                                                                   temperature=0, stop=stop, stream=True)]
    assert "".join(parts) == expected and all(stop not in p for p in parts)


def test_stream_never_splits_a_character_or_shows_a_stop_prefix(served):
    """The engine-thread side of streaming, with a hand-made token sequence: bytes of one emoji in two tokens."""
    tok = served.tokenizer
    text = "ab 🙂 café STOPx"
    ids = tok.encode(text)
    assert len(ids) > len(tok.encode("ab")) + 2  # several tokens, some of them partial characters
    posted = []
    stream = ChoiceStream(0, tok, ["STOP"], posted.append, None, time.perf_counter())
    from custom_llm.generation.batch import TokenStep

    for token in ids:
        if not stream.on_token(TokenStep(token)):
            break
    shown = [e.text for e in posted]
    assert "".join(shown) == "ab 🙂 café "
    assert all("\ufffd" not in s and "S" not in s for s in shown)


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "fox"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy = most likely
    c = client.completions.create(model="tiny-chat", prompt="fox", max_tokens=5, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "fox " * 200}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, served):
    expected = served.tokenizer.decode(reference(served, served.prompt_ids("lazy dog"), 60))
    in_flight = {}
    thread = threading.Thread(target=lambda: in_flight.update(text="".join(
        c.choices[0].text for c in client.completions.create(model="tiny-chat", prompt="lazy dog", max_tokens=60,
                                                              temperature=0, stream=True))))
    thread.start()  # a good request streams while the bad ones arrive
    for payload, status, param in BAD:
        kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
        response = httpx.post(server + "/v1/chat/completions", timeout=30, **kwargs)
        assert response.status_code == status, (payload, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param, (payload, error)
    long = httpx.post(server + "/v1/completions", json={"prompt": "fox " * 200}).json()["error"]
    assert long["code"] == "context_length_exceeded"
    assert httpx.post(server + "/v1/completions", json={"max_tokens": 3}).json()["error"]["param"] == "prompt"
    too_many = httpx.post(server + "/v1/completions", json={"prompt": ["a"] * 10, "n": 8, "max_tokens": 2})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"  # 80 > 8 slots + 64 queued
    huge = httpx.post(server + "/v1/completions", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(server + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    thread.join(60)
    assert in_flight["text"] == expected
    default = httpx.post(server + "/v1/completions", json={"prompt": "lazy dog", "temperature": 0}).json()
    assert default["choices"][0]["text"] == served.tokenizer.decode(reference(served, served.prompt_ids("lazy dog"), 16))
    assert default["usage"]["completion_tokens"] <= 16  # OpenAI's default for completions
    ok = client.completions.create(model="tiny-chat", prompt="fox", max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert metric(server, "custom_llm_active_slots") == 0


def test_disconnect_frees_the_slot(server, served, monkeypatch):
    long = next(p for p in PROMPTS if len(reference(served, served.prompt_ids(p), 80)) == 80)  # greedy: no early stop
    decode = served.engine._decode
    monkeypatch.setattr(served.engine, "_decode", lambda active: time.sleep(0.02) or decode(active))  # >= 1.6 s in all
    before = metric(server, "custom_llm_generation_tokens_total")
    body = {"prompt": long, "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
        assert served.engine.active_slots == 1
    deadline = time.time() + 5
    while served.engine.active_slots and time.time() < deadline:
        time.sleep(0.01)
    assert served.engine.active_slots == 0
    assert metric(server, "custom_llm_generation_tokens_total") - before < 40  # cancelled, not run to the end
    # The same for a non-streamed request whose client gives up waiting.
    before = metric(server, "custom_llm_generation_tokens_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    deadline = time.time() + 5
    while served.engine.active_slots and time.time() < deadline:
        time.sleep(0.01)
    assert served.engine.active_slots == 0
    assert metric(server, "custom_llm_generation_tokens_total") - before < 70


def test_queue_bound_gives_503_then_recovers(ckpt):
    from custom_llm.generation.batch import GenerationRequest

    small = load_served_model(str(ckpt), max_batch=1, max_queue=1)
    with ServerThread(small) as url:
        release = threading.Event()
        # A request whose consumer is slow holds the one slot (and the engine's step) until released.
        busy = small.engine.submit(GenerationRequest([1, 2, 3], 5, on_token=lambda step: release.wait(10) and None))
        body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as second:
            assert second.status_code == 200 and small.engine.queue_depth == 1
            third = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert third.status_code == 503 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == "queue_full"
            release.set()
            assert b"data: [DONE]" in second.read()
        assert busy.done.wait(10) and busy.finish_reason == "length"
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the process memory")
def test_load_32_streaming_clients_on_8_slots(server, served):
    refs = {p: served.tokenizer.decode(reference(served, served.prompt_ids(p), 16)) for p in PROMPTS}
    peak_active = []

    async def client_call(aclient, prompt):
        stream = await aclient.completions.create(model="tiny-chat", prompt=prompt, max_tokens=16, temperature=0,
                                                  stream=True)
        parts = []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            peak_active.append(served.engine.active_slots)
        return prompt, "".join(parts)

    async def clients():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(client_call(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(32)))
        finally:
            await aclient.close()

    def one_round():
        texts = asyncio.run(clients())
        assert len(texts) == 32 and all(text == refs[prompt] for prompt, text in texts)

    one_round()
    before = _rss_bytes()
    for _ in range(2):
        one_round()
    growth = _rss_bytes() - before
    assert max(peak_active) <= 8 and max(peak_active) >= 4  # bounded by the slots, and really batched
    assert metric(server, "custom_llm_active_slots") == 0 and metric(server, "custom_llm_queue_depth") == 0
    assert growth < 40 << 20, f"memory grew by {growth / 2**20:.1f} MiB over 2 rounds"
    assert metric(server, "custom_llm_time_to_first_token_seconds_count") >= 96


def test_health_metrics_and_page(server, client):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    before = metric(server, "custom_llm_generation_tokens_total"), metric(server, "custom_llm_prompt_tokens_total")
    usage = client.completions.create(model="tiny-chat", prompt="fox", max_tokens=7, n=2).usage
    after = metric(server, "custom_llm_generation_tokens_total"), metric(server, "custom_llm_prompt_tokens_total")
    assert after[0] - before[0] == usage.completion_tokens and after[1] - before[1] == 2 * usage.prompt_tokens
    text = httpx.get(server + "/metrics").text
    for name in ("custom_llm_requests_total", "custom_llm_prompt_tokens_total", "custom_llm_generation_tokens_total",
                 "custom_llm_queue_depth", "custom_llm_active_slots", "custom_llm_time_to_first_token_seconds_bucket",
                 "custom_llm_time_per_output_token_seconds_bucket"):
        assert name in text
    assert 'custom_llm_requests_total{endpoint="/v1/completions",status="200"}' in text
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "http" not in page.text.replace("http-equiv", "")


def test_cli_serve(ckpt, tmp_path):
    """``custom-llm serve`` in a subprocess: it prints its address, answers, and stops on SIGINT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*CLI, "serve", "--ckpt", str(ckpt), "--port", "0", "--max-batch", "2",
           "--model-name", "cli-model"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 60
        while "http://" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited early"
        url = line[line.index("http://"):].split()[0]
        deadline = time.time() + 30
        while True:
            try:
                models = httpx.get(url + "/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.1)
        assert models["data"][0]["id"] == "cli-model"
    finally:
        proc.send_signal(2)
        proc.wait(timeout=20)


def test_cli_serve_user_errors(ckpt, tmp_path, capsys):
    from custom_llm.cli import main

    assert main(["serve", "--ckpt", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    assert main(["serve", "--ckpt", str(ckpt), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-batch must be >= 1 (got 0)\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--ckpt", str(ckpt), "--port", str(taken.getsockname()[1])]) == 2
    assert capsys.readouterr().err.startswith("error: cannot listen on 127.0.0.1:")
