"""`mnemosyne bench serve` reports: client-side timings of each request, and from them percentiles of
TTFT and TBT per class, SLO attainment, goodput, throughput, energy per token, the solo target, a
terminal table and a four-panel PNG."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Timing:
    """One request as the client saw it. Times are seconds on the run's clock (0 = trace start)."""

    num_prompt_tokens: int
    num_output_tokens: int
    """Tokens asked for (max_tokens, with ignore_eos)."""
    arrival_s: float
    """When the trace says the request arrives."""
    start_s: float
    """When it was sent."""
    token_s: list[float] = field(default_factory=list)
    """When each streamed chunk with output arrived: one per token, unless the server sent several
    tokens in one chunk. TBT is measured between these, as a user sees it."""
    num_tokens: int | None = None
    """Output tokens the server reported in its usage; None if it sent no usage."""
    num_cached_tokens: int | None = None
    """Prompt tokens the server took from its prefix cache, as its usage says; None if it does not say."""
    end_s: float | None = None
    error: str | None = None
    """Why the request failed (HTTP status and message, or a transport error); None if it finished."""

    @property
    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.start_s if self.token_s else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:], strict=False)]

    @property
    def prefill_span_s(self) -> tuple[float, float]:
        """From sending to the first token (or to the end, if none came): while its prompt is prefilled."""
        end = self.token_s[0] if self.token_s else (self.end_s if self.end_s is not None else self.start_s)
        return self.start_s, end


@dataclass(frozen=True)
class Slos:
    """What a request must meet to count towards goodput."""

    ttft_s: float
    """TTFT SLO of short requests."""
    long_ttft_s_per_token: float
    """A long request's TTFT SLO is its prompt length times this."""
    tbt_s: float
    """Every request's p99 gap between tokens must be within this."""
    long_threshold: int
    """Prompts of at least this many tokens are long."""

    def ttft_slo_s(self, num_prompt_tokens: int) -> float:
        if num_prompt_tokens < self.long_threshold:
            return self.ttft_s
        return max(self.ttft_s, self.long_ttft_s_per_token * num_prompt_tokens)

    def is_met(self, t: Timing) -> bool:
        """Finished, first token within its TTFT SLO, and p99 gap within the TBT SLO."""
        if t.error is not None or t.ttft_s is None or t.ttft_s > self.ttft_slo_s(t.num_prompt_tokens):
            return False
        gaps = t.gaps_s
        return not gaps or percentile(gaps, 99) <= self.tbt_s


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), p)) if len(values) else None


def share(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def class_summary(timings: Sequence[Timing], slos: Slos) -> dict[str, Any]:
    ttft = [t.ttft_s for t in timings if t.ttft_s is not None]
    gaps = [g for t in timings for g in t.gaps_s]
    e2e = [t.end_s - t.start_s for t in timings if t.error is None and t.end_s is not None]
    return {
        "num_requests": len(timings),
        "num_errors": sum(t.error is not None for t in timings),
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "max": max(ttft, default=None)},
        "tbt_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "max": max(gaps, default=None)},
        "e2e_s": {"p50": percentile(e2e, 50), "p99": percentile(e2e, 99)},
        "ttft_attainment": share(t.ttft_s is not None and t.ttft_s <= slos.ttft_slo_s(t.num_prompt_tokens)
                                 for t in timings),
        "tbt_attainment": share(g <= slos.tbt_s for g in gaps),
        "slo_attainment": share(slos.is_met(t) for t in timings),
    }


def during_long_prefill(timings: Sequence[Timing], long_threshold: int) -> tuple[list[Timing], list[float]]:
    """Short requests waiting for their first token while a long prompt was being prefilled, and the
    gaps between tokens of short requests that ended inside such a prefill."""
    spans = [t.prefill_span_s for t in timings if t.num_prompt_tokens >= long_threshold]
    short = [t for t in timings if t.num_prompt_tokens < long_threshold]

    def overlaps(a: float, b: float) -> bool:
        return any(a < end and start < b for start, end in spans)

    waiting = [t for t in short if t.token_s and overlaps(*t.prefill_span_s)]
    gaps = [b - a for t in short for a, b in zip(t.token_s, t.token_s[1:], strict=False)
            if any(start <= b <= end for start, end in spans)]
    return waiting, gaps


def summarize(timings: Sequence[Timing], solo: Sequence[Timing], slos: Slos, duration_s: float,
              energy_j: float | None, server: dict[str, dict[float, float]] | None = None) -> dict[str, Any]:
    """Everything reported about one run. `solo`: short requests sent one at a time before the trace;
    `duration_s`: from the trace's start to its last response; `energy_j`: GPU energy over that time;
    `server`: the server's own histograms over the replay, cumulative {le: count} by name."""
    short = [t for t in timings if t.num_prompt_tokens < slos.long_threshold]
    long = [t for t in timings if t.num_prompt_tokens >= slos.long_threshold]
    waiting, gaps = during_long_prefill(timings, slos.long_threshold)
    duration_s = max(duration_s, 1e-9)
    num_output = sum(len(t.token_s) if t.num_tokens is None else t.num_tokens for t in timings)
    num_prompt = sum(t.num_prompt_tokens for t in timings if t.token_s)
    num_met = sum(slos.is_met(t) for t in timings)
    return {
        "all": class_summary(timings, slos),
        "short": class_summary(short, slos),
        "long": class_summary(long, slos),
        "short_during_long_prefill": class_summary(waiting, slos),
        "solo": class_summary(solo, slos),
        "target": _target(waiting, gaps, solo, slos),
        "duration_s": duration_s,
        "goodput_requests_per_s": num_met / duration_s,
        "throughput": {"requests_per_s": sum(t.error is None for t in timings) / duration_s,
                       "output_tokens_per_s": num_output / duration_s,
                       "prompt_tokens_per_s": num_prompt / duration_s},
        "energy": _energy(energy_j, duration_s, num_prompt, num_output),
        "max_send_lag_s": max((t.start_s - t.arrival_s for t in timings), default=0.0),
        "num_cached_prompt_tokens": sum(t.num_cached_tokens or 0 for t in timings),
        "server": {name: within_bound(buckets, slos.tbt_s) for name, buckets in (server or {}).items()},
    }


def within_bound(buckets: dict[float, float], limit_s: float) -> dict[str, Any]:
    """Of a histogram's observations, how many, and the share at or under its largest bucket bound
    that is not over `limit_s` (the TBT SLO where it is a bound)."""
    count = buckets.get(math.inf, max(buckets.values(), default=0.0))
    bounds = [le for le in buckets if le <= limit_s * (1 + 1e-9)]
    bound = max(bounds, default=None)
    return {"count": count, "bound_s": bound,
            "share": buckets[bound] / count if bound is not None and count else None}


def _target(waiting: Sequence[Timing], gaps: Sequence[float], solo: Sequence[Timing], slos: Slos) -> dict[str, Any]:
    """Issue 9's target: with a long prefill running, short requests' p99 TTFT within 2× of their solo
    p99, and p99 TBT within the SLO."""
    during = percentile([t.ttft_s for t in waiting], 99)  # type: ignore[misc]
    alone = percentile([t.ttft_s for t in solo if t.ttft_s is not None], 99)  # type: ignore[misc]
    ratio = during / alone if during is not None and alone else None
    tbt = percentile(gaps, 99)
    # no gap ending inside a long prefill: nothing decoded beside it, so the TBT half holds trivially
    is_met = None if ratio is None else bool(ratio <= 2.0 and (tbt is None or tbt <= slos.tbt_s))
    return {"short_ttft_p99_during_long_s": during, "solo_ttft_p99_s": alone, "ttft_ratio": ratio,
            "short_tbt_p99_during_long_s": tbt, "num_gaps_during_long": len(gaps), "is_met": is_met}


def _energy(energy_j: float | None, duration_s: float, num_prompt: int, num_output: int) -> dict[str, Any]:
    if energy_j is None:
        return {"joules": None, "mean_power_w": None, "j_per_token": None, "j_per_output_token": None}
    return {"joules": energy_j, "mean_power_w": energy_j / duration_s,
            "j_per_token": energy_j / max(1, num_prompt + num_output),
            "j_per_output_token": energy_j / max(1, num_output)}


# -- terminal table --------------------------------------------------------------------------------
_CLASSES = (("short", "short"), ("long", "long"), ("short_during_long_prefill", "short*"), ("solo", "solo"))


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """One block per run: a row per class, then goodput, throughput, energy and the target."""
    head = (f"{'run':<22} {'class':<7} {'n':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'TBT p50':>8} "
            f"{'TBT p99':>8} {'TTFT SLO':>8} {'TBT SLO':>8} {'all SLOs':>8}")
    lines = [head]
    for label, s in runs.items():
        for key, name in _CLASSES:
            c = s[key]
            if not c["num_requests"]:
                continue
            lines.append(f"{label[:22]:<22} {name:<7} {c['num_requests']:>5} {c['num_errors']:>4} "
                         f"{_s(c['ttft_s']['p50']):>9} {_s(c['ttft_s']['p99']):>9} {format_ms(c['tbt_s']['p50']):>8} "
                         f"{format_ms(c['tbt_s']['p99']):>8} {format_pct(c['ttft_attainment']):>8} "
                         f"{format_pct(c['tbt_attainment']):>8} {format_pct(c['slo_attainment']):>8}")
            label = ""
        e, t, g = s["energy"], s["target"], s["throughput"]
        energy = "n/a" if e["joules"] is None else \
            f"{e['j_per_token']:.3g} J/token, {e['j_per_output_token']:.3g} J/output token, {e['mean_power_w']:.0f} W"
        lines.append(f"    goodput {s['goodput_requests_per_s']:.2f} req/s; {g['output_tokens_per_s']:.0f} output tok/s, "
                     f"{g['prompt_tokens_per_s']:.0f} prompt tok/s over {s['duration_s']:.1f} s; energy {energy}")
        server = s.get("server") or {}
        if server:
            client = s["all"]["tbt_attainment"]
            parts = [f"{what} within {format_ms(h['bound_s'])} {format_pct(h['share'])} of {h['count']:.0f}"
                     for key, what in (("step", "steps"), ("tbt", "API-process TBT")) if (h := server.get(key))]
            lines.append(f"    server (/metrics, every request): {'; '.join(parts)}; client TBT within SLO "
                         f"{format_pct(client)}")
        if t["ttft_ratio"] is not None:
            verdict = {True: "met", False: "missed", None: "n/a"}[t["is_met"]]
            lines.append(f"    target ({verdict}): short p99 TTFT during long prefill {_s(t['short_ttft_p99_during_long_s'])}"
                         f" = {t['ttft_ratio']:.2f}x solo {_s(t['solo_ttft_p99_s'])} (<= 2x); p99 TBT during long "
                         f"prefill {format_ms(t['short_tbt_p99_during_long_s'])}")
    lines.append("short* = short requests that waited for their first token while a long prompt was prefilled; "
                 "SLO columns are attainment")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}ms"


def format_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# -- plots -----------------------------------------------------------------------------------------
def plot(runs: dict[str, tuple[list[Timing], list[Timing]]], slos: Slos, path: str | Path, title: str) -> None:
    """Four panels, one colour per run: short TTFT CDF (solo dashed), TBT CDF, short TTFT over time and
    the largest gap between tokens over time, with each run's long prefills shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 8.5))
    for i, (label, (timings, solo)) in enumerate(runs.items()):
        color = f"C{i}"
        short = [t for t in timings if t.num_prompt_tokens < slos.long_threshold]
        _cdf(ax[0, 0], [t.ttft_s for t in short if t.ttft_s is not None], color, label)
        _cdf(ax[0, 0], [t.ttft_s for t in solo if t.ttft_s is not None], color, f"{label} (solo)", ls="--")
        _cdf(ax[0, 1], [g * 1e3 for t in short for g in t.gaps_s], color, f"{label} short")
        _cdf(ax[0, 1], [g * 1e3 for t in timings if t.num_prompt_tokens >= slos.long_threshold
                        for g in t.gaps_s], color, f"{label} long", ls=":")
        for start, end in (t.prefill_span_s for t in timings if t.num_prompt_tokens >= slos.long_threshold):
            for a in ax[1]:
                a.axvspan(start, end, color=color, alpha=0.08)
        done = [t for t in short if t.ttft_s is not None]
        ax[1, 0].scatter([t.start_s for t in done], [t.ttft_s for t in done], s=6, color=color, label=label)
        times, worst = max_gap_series(timings)
        ax[1, 1].step(times, worst, where="post", color=color, lw=0.8, label=label)
    ax[0, 0].axvline(slos.ttft_s, color="r", ls="--", lw=1, label="TTFT SLO")
    ax[0, 0].set(xscale="log", xlabel="TTFT (s)", ylabel="CDF", title="short requests: time to first token")
    ax[0, 1].axvline(slos.tbt_s * 1e3, color="r", ls="--", lw=1, label="TBT SLO")
    ax[0, 1].set(xscale="log", xlabel="time between tokens (ms)", ylabel="CDF", title="time between tokens")
    ax[1, 0].axhline(slos.ttft_s, color="r", ls="--", lw=1)
    ax[1, 0].set(yscale="log", xlabel="sent at (s); shaded: long prefills", ylabel="TTFT (s)",
                 title="short requests' TTFT over time")
    ax[1, 1].axhline(slos.tbt_s * 1e3, color="r", ls="--", lw=1)
    ax[1, 1].set(yscale="log", xlabel="time (s); shaded: long prefills", ylabel="ms",
                 title="largest gap between tokens over time")
    for a in ax.flat:
        a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(ax: Any, values: Sequence[float], color: str, label: str, ls: str = "-") -> None:
    if values:
        ax.plot(np.sort(values), np.linspace(0, 1, len(values)), color=color, ls=ls, lw=1, label=label)


def max_gap_series(timings: Sequence[Timing], num_buckets: int = 200) -> tuple[list[float], list[float]]:
    """The largest gap between tokens (ms) ending in each of about num_buckets equal time buckets, as
    (bucket start times, values); buckets with no gap are left out."""
    ends = [t.token_s[-1] for t in timings if t.token_s]
    if not ends:
        return [], []
    bucket_s = max(max(ends) / num_buckets, 0.05)
    worst: dict[int, float] = {}
    for t in timings:
        for a, b in zip(t.token_s, t.token_s[1:], strict=False):
            k = int(b / bucket_s)
            worst[k] = max(worst.get(k, 0.0), (b - a) * 1e3)
    keys = sorted(worst)
    return [k * bucket_s for k in keys], [worst[k] for k in keys]
