"""Serving: output tokens/s and time to first token through HTTP streaming, at several concurrencies.

Three servers run the same checkpoint (the ``small`` preset, random weights, a BPE tokenizer trained
on the default corpus), each in its own process, one after the other:

* ours: ``custom-llm serve`` with continuous batching (``--max-batch 8``);
* ours one at a time: ``custom-llm serve --max-batch 1`` (requests queue for the single slot);
* the reference: Hugging Face ``transformers serve`` on the exported folder (``export_hf``), when it
  is installed and starts.

The client (this process, asyncio) streams ``/v1/completions`` with ``temperature 0`` at each
concurrency c in (1, 8, 32): c workers send 4, 24 and 32 requests in all, each with a 16-word
prompt and its own ``max_tokens`` (drawn once, the same for every server, so requests finish at
different times as real traffic does). Output tokens are the usage counts the servers report;
tokens/s is their sum over the wall time of the round; time to first token is from sending a
request to its first non-empty text chunk. ``ours`` / ``ref`` are tokens/s at concurrency 8.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .context import Context
from .core import Result

CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 4, 8: 24, 32: 32}
"""Requests sent at each concurrency: three waves at 8 (so most arrive while others generate), one at 32."""
CLI = [sys.executable, "-c", "import sys; from custom_llm.cli import main; sys.exit(main(sys.argv[1:]))"]


def _checkpoint(ctx: Context, folder: Path) -> tuple[Path, Optional[Path], list[str]]:
    """(our checkpoint, the exported HF folder or None, prompts) for the bench model."""
    import torch

    from ..checkpoint_io import save_model
    from ..config import model_preset
    from ..model import Transformer
    from ..tokenizers import train_tokenizer
    from .tokenize_case import _corpus_slice

    texts = [d.text for d in _corpus_slice(200_000 if ctx.quick else 2_000_000)]
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=512 if ctx.quick else 8192)
    overrides = dict(vocab_size=tokenizer.vocab_size)
    if ctx.quick:
        overrides.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    torch.manual_seed(ctx.seed)
    model = Transformer(model_preset("small", **overrides))
    ckpt = folder / "ckpt"
    save_model(model, ckpt)
    tokenizer.save(ckpt)
    hf = None
    try:
        from ..interop import export_hf

        hf = export_hf(ckpt, folder / "hf", dtype="float32")
    except Exception as exc:  # noqa: BLE001 - the reference side is optional
        print(f"[serve] no HF export ({type(exc).__name__}: {exc}); skipping transformers serve", file=sys.stderr)
    rng = random.Random(ctx.seed)
    words = " ".join(texts)[:200_000].split()
    prompts = [" ".join(words[i:i + 16]) for i in (rng.randrange(len(words) - 16) for _ in range(64))]
    return ckpt, hf, prompts


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A server subprocess on 127.0.0.1; ``url`` once it answers /v1/models."""

    def __init__(self, cmd: list[str], port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        import torch

        # The servers use as many torch threads as this process (``custom-llm bench --threads N``).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> str:
        import httpx2

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"server exited with {self.proc.returncode}: " + " | ".join(tail))
            try:
                return httpx2.get(self.url + "/v1/models", timeout=5).json()["data"][0]["id"]
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError("server did not start in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, output tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), (usage if usage is not None else chunks)


async def _round(url: str, model: str, jobs: list[tuple[str, int]], concurrency: int) -> dict:
    """Send ``jobs`` with ``concurrency`` workers; tokens/s and TTFT percentiles."""
    import httpx2

    queue = list(jobs)
    ttfts, tokens = [], []
    limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx2.AsyncClient(timeout=1800, limits=limits) as client:
        async def worker():
            while queue:
                prompt, max_tokens = queue.pop(0)
                t, n = await _one(client, url, model, prompt, max_tokens)
                ttfts.append(t)
                tokens.append(n)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts.sort()
    return {"tokens_per_s": round(sum(tokens) / wall, 2), "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4), "requests": len(jobs),
            "tokens": sum(tokens), "wall_s": round(wall, 2)}


def _measure(server: _Server, jobs_by_c: dict[int, list], name: str) -> dict:
    try:
        model = server.wait_ready()
        asyncio.run(_round(server.url, model, jobs_by_c[1][:1], 1))  # warm-up
        table = {}
        for c, jobs in jobs_by_c.items():
            table[c] = asyncio.run(_round(server.url, model, jobs, c))
            print(f"[serve] {name} c={c}: {table[c]}", file=sys.stderr, flush=True)
        return table
    finally:
        server.stop()


def serve(ctx: Context) -> Result:
    """Tokens/s and TTFT of our batching server against one-at-a-time serving and ``transformers serve``."""
    import logging

    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no line per request
    rng = random.Random(ctx.seed + 1)
    low, high = (4, 8) if ctx.quick else (32, 64)
    work = Path(tempfile.mkdtemp(prefix="custom-llm-bench-serve-"))
    try:
        ckpt, hf, prompts = _checkpoint(ctx, work)
        counts = {1: 2, 8: 8, 32: 32} if ctx.quick else REQUESTS
        jobs_by_c = {c: [(prompts[i % len(prompts)], rng.randint(low, high)) for i in range(counts[c])]
                     for c in CONCURRENCY}
        device = ctx.device.type
        ours_cmd = [*CLI, "serve", "--ckpt", str(ckpt), "--device", device, "--max-queue", "256",
                    "--compile" if ctx.compile else "--no-compile"]
        tables = {}
        for name, batch in (("ours", 8), ("ours_max_batch_1", 1)):
            port = _free_port()
            server = _Server([*ours_cmd, "--port", str(port), "--max-batch", str(batch)], port, work / f"{name}.log")
            tables[name] = _measure(server, jobs_by_c, name)
        ref_note = None
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        if hf is None or exe is None:
            ref_note = "transformers serve not available (no transformers CLI or no HF export)"
        else:
            port = _free_port()
            server = _Server([exe, "serve", str(hf), "--host", "127.0.0.1", "--port", str(port), "--device", device],
                             port, work / "transformers.log")
            try:
                tables["transformers_serve"] = _measure(server, jobs_by_c, "transformers serve")
            except Exception as exc:  # noqa: BLE001 - report why the reference is missing
                ref_note = f"transformers serve failed: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = tables["ours"][8]["tokens_per_s"]
    ref = tables.get("transformers_serve", {}).get(8, {}).get("tokens_per_s")
    one = tables["ours_max_batch_1"][8]["tokens_per_s"]
    ttft_ratio = tables["ours"][8]["ttft_p50_s"] / tables["ours"][1]["ttft_p50_s"]
    config = {"model": "small preset" + (" (quick: d64 L2)" if ctx.quick else ""), "endpoint": "/v1/completions stream",
              "max_tokens": [low, high], "prompt_words": 16, "server_threads": _threads(), "tables": {k: {str(c): v for c, v in t.items()}
                                                                          for k, t in tables.items()},
              "speedup_vs_one_at_a_time_c8": round(ours / one, 2),
              "ttft_p50_c8_over_c1": round(ttft_ratio, 2), "higher_is_better": True,
              "note": (f"conc 8: {ours:.0f} tok/s, {ours / one:.2f}x one-at-a-time, "
                       + (f"{ours / ref:.2f}x transformers serve" if ref else ref_note or "no reference")
                       + f"; p50 TTFT c8/c1 {ttft_ratio:.2f}")}
    if ref_note:
        config["ref_note"] = ref_note
    return Result("serve", ours, ref, "tokens/s", ctx.device.type, config)
