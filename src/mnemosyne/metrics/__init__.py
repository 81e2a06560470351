"""Serving metrics: per-request latencies (TTFT, TBT, E2E) and engine state, exported to Prometheus.

Formal definitions are in docs/metrics.md.
"""
