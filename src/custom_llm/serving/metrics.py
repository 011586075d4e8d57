"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; first-token latency includes queueing and prefill, so its buckets reach further.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Requests by endpoint and status, token counts, queue and slot gauges, latency histograms."""

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("custom_llm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("custom_llm_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.generation_tokens = Counter("custom_llm_generation_tokens", "Tokens generated", registry=registry)
        queue = Gauge("custom_llm_queue_depth", "Requests waiting for a slot", registry=registry)
        queue.set_function(lambda: engine.queue_depth)
        active = Gauge("custom_llm_active_slots", "Slots generating a request", registry=registry)
        active.set_function(lambda: engine.active_slots)
        Gauge("custom_llm_slots", "Slots of the batching engine (max batch)", registry=registry).set(engine.max_batch)
        self.ttft = Histogram("custom_llm_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.per_token = Histogram("custom_llm_time_per_output_token_seconds",
                                   "Between consecutive tokens of one choice", buckets=TOKEN_BUCKETS, registry=registry)
