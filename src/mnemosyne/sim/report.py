"""Simulator reports: TTFT, TBT and E2E percentiles by request class, SLO attainment, throughput,
a down-sampled time series (JSON), and a four-panel PNG."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemosyne.bench.serve_report import Timing, during_long_prefill
from mnemosyne.request import Request
from mnemosyne.sim.simulator import SimResult

PERCENTILES = (50, 90, 99)
MAX_SERIES_POINTS = 1000


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["max"] = float(arr.max())
    out["mean"] = float(arr.mean())
    return out


def _class_summary(requests: Sequence[Request], deadline_s: Callable[[Request], float],
                   tbt_slo_s: float | None) -> dict[str, Any]:
    ttft = [r.metrics.ttft_s for r in requests]
    gaps = [g for r in requests for g in r.metrics.inter_token_s]
    e2e = [r.metrics.finished_s - r.metrics.arrival_s for r in requests]  # type: ignore[operator]
    summary: dict[str, Any] = {
        "num_requests": len(requests),
        "ttft_s": _percentiles(ttft),  # type: ignore[arg-type]
        "tbt_s": _percentiles(gaps),
        "e2e_s": _percentiles(e2e),
        "ttft_attainment": _share(t <= deadline_s(r) for t, r in zip(ttft, requests, strict=True)),  # type: ignore[operator]
    }
    if tbt_slo_s is not None:
        summary["tbt_attainment"] = _share(g <= tbt_slo_s for g in gaps)
        summary["requests_p99_tbt_within_slo"] = _share(
            not r.metrics.inter_token_s or np.percentile(r.metrics.inter_token_s, 99) <= tbt_slo_s for r in requests)
    return summary


def _during_long_prefill(requests: Sequence[Request], long_threshold: int, deadline_s: Callable[[Request], float],
                         tbt_slo_s: float | None) -> dict[str, Any]:
    """`bench serve`'s short* class, chosen by its own `during_long_prefill` from the simulated token times:
    short requests that waited for their first token while a long prompt was prefilled; their TBT is
    over the gaps that ended inside such a prefill."""
    timings = [Timing(r.num_prompt_tokens, r.num_output_tokens, r.metrics.arrival_s, r.metrics.arrival_s,
                      list(itertools.accumulate(r.metrics.inter_token_s, initial=r.metrics.first_token_s)))
               for r in requests]
    waiting, gaps = during_long_prefill(timings, long_threshold)
    chosen = {id(t) for t in waiting}
    summary = _class_summary([r for r, t in zip(requests, timings, strict=True) if id(t) in chosen], deadline_s,
                             tbt_slo_s)
    summary["tbt_s"] = _percentiles(gaps)
    if tbt_slo_s is not None:
        summary["tbt_attainment"] = _share(g <= tbt_slo_s for g in gaps)
    return summary


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def summarize(result: SimResult, deadline_s: Callable[[Request], float], tbt_slo_s: float | None,
              long_threshold: int) -> dict[str, Any]:
    """Metrics of a finished simulation. `deadline_s(request)` is the TTFT deadline after arrival that
    attainment is judged against; a request is long when its prompt has >= long_threshold tokens."""
    requests = result.requests
    short = [r for r in requests if r.num_prompt_tokens < long_threshold]
    long = [r for r in requests if r.num_prompt_tokens >= long_threshold]
    start_s = min(r.metrics.arrival_s for r in requests)
    makespan_s = max(r.metrics.finished_s for r in requests) - start_s  # type: ignore[type-var]
    steps = result.steps
    return {
        "all": _class_summary(requests, deadline_s, tbt_slo_s),
        "short": _class_summary(short, deadline_s, tbt_slo_s),
        "long": _class_summary(long, deadline_s, tbt_slo_s),
        "short_during_long_prefill": _during_long_prefill(requests, long_threshold, deadline_s, tbt_slo_s),
        "long_threshold_tokens": long_threshold,
        "makespan_s": makespan_s,
        "throughput": {
            "requests_per_s": len(requests) / makespan_s,
            "output_tokens_per_s": sum(r.num_output_tokens for r in requests) / makespan_s,
            "prompt_tokens_per_s": sum(r.num_prompt_tokens for r in requests) / makespan_s,
        },
        "num_steps": len(steps.step_s),
        "step_s": _percentiles(steps.step_s),
        "num_preemptions": result.num_preemptions,
        "sim_wall_s": result.wall_s,
        "series": _series(result),
    }


def _series(result: SimResult) -> dict[str, list[float]]:
    """The step series in at most MAX_SERIES_POINTS buckets: mean of counts, max of step time."""
    s = result.steps
    n = len(s.step_s)
    if n == 0:
        return {}
    edges = np.linspace(0, n, min(n, MAX_SERIES_POINTS) + 1).astype(int)

    def reduce(values, fn) -> list[float]:
        arr = np.asarray(values, dtype=np.float64)
        return [round(float(fn(arr[a:b])), 6) for a, b in itertools.pairwise(edges)]

    return {"time_s": reduce(s.start_s, np.min), "max_step_s": reduce(s.step_s, np.max),
            "tokens": reduce(s.num_tokens, np.mean), "decodes": reduce(s.num_decodes, np.mean),
            "running": reduce(s.num_running, np.mean), "waiting": reduce(s.num_waiting, np.mean)}


def plot(result: SimResult, summary: dict[str, Any], path: str | Path, title: str,
         tbt_slo_s: float | None) -> None:
    """Four panels: step time over time, TTFT against prompt length, TBT CDF, queue lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = summary["series"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0, 0].plot(series["time_s"], np.asarray(series["max_step_s"]) * 1e3, lw=0.6)
    if tbt_slo_s is not None:
        ax[0, 0].axhline(tbt_slo_s * 1e3, color="r", ls="--", lw=1, label="TBT SLO")
        ax[0, 0].legend()
    ax[0, 0].set(xlabel="time (s)", ylabel="step time (ms), max per bucket", yscale="log", title="step time")
    prompts = [r.num_prompt_tokens for r in result.requests]
    ax[0, 1].scatter(prompts, [r.metrics.ttft_s for r in result.requests], s=4)
    ax[0, 1].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (s)", title="TTFT")
    gaps = np.sort([g for r in result.requests for g in r.metrics.inter_token_s]) * 1e3
    if len(gaps):
        ax[1, 0].plot(gaps, np.linspace(0, 1, len(gaps)))
    if tbt_slo_s is not None:
        ax[1, 0].axvline(tbt_slo_s * 1e3, color="r", ls="--", lw=1)
    ax[1, 0].set(xscale="log", xlabel="TBT (ms)", ylabel="CDF", title="time between tokens")
    ax[1, 1].plot(series["time_s"], series["running"], label="running", lw=0.6)
    ax[1, 1].plot(series["time_s"], series["waiting"], label="waiting", lw=0.6)
    ax[1, 1].set(xlabel="time (s)", ylabel="requests", title="queues")
    ax[1, 1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
