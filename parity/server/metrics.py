"""Prometheus metrics of the parity server (`GET /metrics`).

Names and meanings (all measured by the HTTP layer, one registry per app so several apps can live in
one process):

- `parity_requests_total{endpoint, status}`                counter, finished HTTP requests by status code
- `parity_request_ttft_seconds`                            histogram, time to first token: first generated
                                                           token seen by the server - request arrival (s)
- `parity_request_tpot_seconds`                            histogram, time per output token after the first:
                                                           (E2E - TTFT) / (output_tokens - 1) (s)
- `parity_request_e2e_seconds`                             histogram, request arrival -> last token (s)
- `parity_prompt_tokens_total`, `parity_generation_tokens_total`  counters (tokens)
- `parity_num_requests_running`, `parity_num_requests_waiting`    gauges, read from `engine.stats()` at scrape
- `parity_cache_used_bytes`, `parity_cache_total_bytes`, `parity_cache_usage_ratio`  gauges, cache pool usage
- `parity_http_requests_in_flight`                         gauge, generation requests being served
- `parity_prefix_cache_queries_total`, `parity_prefix_cache_hits_total`  counters read from `engine.stats()`:
                                                           prompt tokens looked up in / served from the prefix
                                                           cache (tokens; vLLM's `prefix_cache_queries/hits`)

TTFT/TPOT/E2E follow the definitions in vLLM's `bench serve` (vllm/benchmarks/serve.py), measured here
on the server side, so they exclude network time. Histogram buckets (s) are parity's choice: they
span a CPU miniature (milliseconds) up to a large model under heavy load (minutes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS_S = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """Reads `engine.stats()` at scrape time (no background polling)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self):
        s = None
        for _ in range(3):  # the engine thread may be mid-update; a retry reads a consistent view
            try:
                s = dict(self._stats() or {})
                break
            except Exception:
                continue
        if s is None:  # leave the gauges out rather than report a false zero
            return
        used = float(s.get("cache_used_bytes", 0) or 0)
        total = float(s.get("cache_total_bytes", 0) or 0)
        for name, doc, val in (
            ("parity_num_requests_running", "Requests in the engine's running batch.", s.get("num_running", 0)),
            ("parity_num_requests_waiting", "Requests waiting for admission to the batch.", s.get("num_waiting", 0)),
            ("parity_cache_used_bytes", "Cache pool bytes held by sequences (bytes).", used),
            ("parity_cache_total_bytes", "Cache pool size (bytes).", total),
            ("parity_cache_usage_ratio", "Cache pool usage, used / total (0..1).", used / total if total else 0.0),
            (
                "parity_compiled_decode_buckets_ready",
                "Decode batch buckets of the compiled step that are compiled and serving (0 when eager).",
                s.get("compiled_buckets_ready", 0),
            ),
            (
                "parity_compiled_decode_buckets_total",
                "Decode batch buckets the compiled step compiles at start-up (0 when eager).",
                s.get("compiled_buckets_total", 0),
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(val or 0))
            yield g
        for name, doc in (
            ("parity_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (tokens)."),
            ("parity_prefix_cache_hits", "Prompt tokens served from the prefix cache (tokens)."),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(name.removeprefix("parity_") + "_total", 0) or 0))
            yield c

    def describe(self):
        return []


class ServerMetrics:
    """All metrics of one server app, in their own `CollectorRegistry`.

    Args:
        stats: a callable returning the engine's stats dict (`AsyncEngine.stats`).
    """

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "parity_requests", "Finished HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "parity_request_ttft_seconds", "Time to first token (s), server side.", buckets=TTFT_BUCKETS_S, registry=r
        )
        self.tpot = Histogram(
            "parity_request_tpot_seconds",
            "Time per output token after the first (s), server side.",
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "parity_request_e2e_seconds",
            "End-to-end request latency (s), server side.",
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("parity_prompt_tokens", "Prompt tokens processed (tokens).", registry=r)
        self.generation_tokens = Counter("parity_generation_tokens", "Tokens generated (tokens).", registry=r)
        self.in_flight = Gauge("parity_http_requests_in_flight", "Generation requests being served.", registry=r)
        r.register(_EngineCollector(stats))

    def observe_request(
        self, *, arrival_s: float, first_token_s: float | None, finish_s: float, num_output_tokens: int
    ) -> None:
        """Record the latencies of one finished engine request (times from `time.perf_counter`, s)."""
        self.e2e.observe(max(0.0, finish_s - arrival_s))
        if first_token_s is not None:
            ttft = max(0.0, first_token_s - arrival_s)
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe(max(0.0, finish_s - first_token_s) / (num_output_tokens - 1))

    def in_flight_count(self) -> int:
        """Generation requests being served now (the `parity_http_requests_in_flight` gauge)."""
        return int(self.registry.get_sample_value("parity_http_requests_in_flight") or 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
