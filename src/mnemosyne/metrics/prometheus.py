"""Prometheus metrics of one server: request latencies, token counters and engine-core state.

Each ServerMetrics has its own registry, so several servers (or tests) in one process never clash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from mnemosyne.engine.core_wire import Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                   320.0, 640.0, 1280.0, 2560.0)
_TBT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                  2.5, 5.0, 10.0)
_E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0,
                  1920.0, 3840.0)
_BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 17))
_BATCH_REQUEST_BUCKETS = tuple(float(2**i) for i in range(0, 11))


class ServerMetrics:
    """The server's metrics; engine-core state is refreshed from each core stats report."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram("mnemosyne_time_to_first_token_seconds",
                                "Arrival of the HTTP request to the first output token reaching the API process",
                                buckets=_TTFT_BUCKETS_S, registry=r)
        self.tbt_s = Histogram("mnemosyne_time_between_tokens_seconds",
                               "Gap between consecutive output tokens of a request reaching the API process",
                               buckets=_TBT_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("mnemosyne_e2e_request_latency_seconds",
                               "Arrival of the HTTP request to its last token (or its abort)",
                               buckets=_E2E_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("mnemosyne_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("mnemosyne_generation_tokens", "Output tokens generated", registry=r)
        self.requests_finished = Counter("mnemosyne_requests_finished", "Engine requests that ended, by reason",
                                         ["finish_reason"], registry=r)
        self.requests_rejected = Counter("mnemosyne_requests_rejected",
                                         "HTTP requests refused by admission control (429), by limit",
                                         ["limit"], registry=r)
        self.num_running = Gauge("mnemosyne_num_requests_running", "Requests in the engine's running set",
                                 registry=r)
        self.num_waiting = Gauge("mnemosyne_num_requests_waiting", "Requests queued in the engine core",
                                 registry=r)
        self.num_preempted = Gauge("mnemosyne_num_requests_preempted",
                                   "Waiting requests that were preempted (their KV freed, to be recomputed)",
                                   registry=r)
        self.num_preemptions = Gauge("mnemosyne_num_preemptions",
                                     "Preemptions since the engine core started", registry=r)
        self.kv_usage = Gauge("mnemosyne_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.step_s = Histogram("mnemosyne_step_duration_seconds", "Time of one landed engine step",
                                buckets=_TBT_BUCKETS_S, registry=r)
        self.step_tokens = Histogram("mnemosyne_step_batch_tokens", "Tokens computed in one engine step",
                                     buckets=_BATCH_TOKEN_BUCKETS, registry=r)
        self.step_requests = Histogram("mnemosyne_step_batch_requests", "Requests in one engine step",
                                       buckets=_BATCH_REQUEST_BUCKETS, registry=r)
        self.prefix_queried_tokens = Counter(
            "mnemosyne_prefix_cache_queried_tokens",
            "Tokens of requests admitted with prefix caching on (readmissions after preemption too)", registry=r)
        self.prefix_hit_tokens = Counter("mnemosyne_prefix_cache_hit_tokens",
                                         "Of the queried tokens, those whose KV was reused from the prefix cache",
                                         registry=r)
        self.prefix_evicted_blocks = Counter("mnemosyne_prefix_cache_evicted_blocks",
                                             "Cached KV blocks evicted from the prefix cache to make room", registry=r)
        self._prefix_totals = (0, 0, 0)
        """The core's running totals at its previous report: the counters grow by the difference."""
        self.is_core_alive = Gauge("mnemosyne_engine_core_alive", "1 while the engine-core process serves",
                                   registry=r)

    def observe_finished(self, e2e_s: float, finish_reason: str) -> None:
        self.e2e_s.observe(e2e_s)
        self.requests_finished.labels(finish_reason).inc()

    def observe_stats(self, stats: Stats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.num_preempted.set(stats.num_waiting_preempted)
        self.num_preemptions.set(stats.num_preemptions)
        self.kv_usage.set(stats.kv_usage)
        totals = (stats.num_prefix_queried_tokens, stats.num_prefix_hit_tokens, stats.num_prefix_evicted_blocks)
        counters = (self.prefix_queried_tokens, self.prefix_hit_tokens, self.prefix_evicted_blocks)
        for counter, total, previous in zip(counters, totals, self._prefix_totals, strict=True):
            counter.inc(max(0, total - previous))
        self._prefix_totals = totals
        if stats.num_step_requests:
            self.step_s.observe(stats.step_s)
            self.step_tokens.observe(stats.num_step_tokens)
            self.step_requests.observe(stats.num_step_requests)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
