"""The chat page in a real browser: headless Chromium (Debian's package) driven by playwright."""

import os
import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (pip install -e '.[test]')")

from custom_llm import ModelConfig, Transformer  # noqa: E402
from custom_llm.checkpoint_io import save_model  # noqa: E402
from custom_llm.serving import ServerThread, load_served_model  # noqa: E402
from custom_llm.tokenizers import train_tokenizer  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_page_streams_an_answer_and_keeps_the_conversation(tmp_path):
    tokenizer = train_tokenizer(["a small corpus for a tiny chat model. " * 30], kind="bpe", vocab_size=280)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=256, init_std=0.3))
    save_model(model, tmp_path / "page-model")
    tokenizer.save(tmp_path / "page-model")
    served = load_served_model(str(tmp_path / "page-model"), max_batch=2)
    decode = served.engine._decode  # each step made to take >= 30 ms, so the page is seen mid-answer
    served.engine._decode = lambda active: time.sleep(0.03) or decode(active)
    with ServerThread(served) as url, sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as exc:  # noqa: BLE001 - a browser that cannot start here is a skip, not a failure
            pytest.skip(f"chromium did not start: {str(exc).splitlines()[0]}")
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('page-model')", timeout=10_000)
            assert page.input_value("#temperature") == "0.7"  # the sampling settings are on the page
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            lengths = []
            page.fill("#input", "hello there")
            page.keyboard.press("Enter")
            answer = page.locator(".msg.assistant").first
            for _ in range(400):  # watch the answer grow while it streams
                lengths.append(len(answer.inner_text()))
                if page.locator(".msg.assistant .meta").count():
                    break
                page.wait_for_timeout(5)
            final = answer.inner_text()
            assert page.locator(".msg.user").first.inner_text() == "hello there"
            assert len(final) > 0 and ("length" in final or "stop" in final)
            assert len({n for n in lengths if n > 0}) >= 2, "the answer appeared all at once, not streamed"
            page.fill("#input", "and again")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=20_000)
            assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
            assert not page.locator(".msg.error").count()
            assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]  # the conversation is kept
            assert sent[1]["stream"] is True and sent[1]["temperature"] == 0 and sent[1]["max_tokens"] == 40
        finally:
            browser.close()
