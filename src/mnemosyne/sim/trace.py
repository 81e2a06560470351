"""Request traces for the simulator and `mnemosyne bench serve`: JSONL files of (arrival, prompt length,
output length), and seeded generators (Poisson arrivals of chat-sized requests mixed with a few very
long ones, some at given times)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    """Seconds from the start of the trace."""
    num_prompt_tokens: int
    num_output_tokens: int
    deadline_s: float | None = None
    """First token due this long after arrival; None: from the engine's SLO rule."""
    priority: int = 0
    """Lower is more urgent."""

    def __post_init__(self) -> None:
        if self.num_prompt_tokens <= 0 or self.num_output_tokens <= 0 or self.arrival_s < 0:
            raise ValueError(f"a trace request needs positive token counts and arrival >= 0, got {self}")


def load_trace(path: str | Path) -> list[TraceRequest]:
    """One JSON object a line: arrival_s, num_prompt_tokens, num_output_tokens[, deadline_s, priority]."""
    trace = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                trace.append(TraceRequest(**json.loads(line)))
            except (TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"--trace {str(path)!r} line {number}: {e}") from e
    return sorted(trace, key=lambda r: r.arrival_s)


def save_trace(path: str | Path, trace: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for request in trace:
            f.write(json.dumps({k: v for k, v in asdict(request).items() if v is not None}) + "\n")


@dataclass(frozen=True)
class MixedWorkload:
    """Poisson arrivals; most requests chat-sized, a few with very long prompts. Lengths are
    log-uniform within each range."""

    num_requests: int = 1000
    rate_per_s: float = 1.0
    """Mean arrivals per second."""
    long_fraction: float = 0.02
    """Share of requests with a long prompt."""
    long_prompt_tokens: tuple[int, int] = (128 * 1024, 1024 * 1024)
    short_prompt_tokens: tuple[int, int] = (128, 4096)
    output_tokens: tuple[int, int] = (32, 512)
    seed: int = 0

    def generate(self) -> list[TraceRequest]:
        rng = random.Random(self.seed)
        now_s, trace = 0.0, []
        for _ in range(self.num_requests):
            now_s += rng.expovariate(self.rate_per_s)
            is_long = rng.random() < self.long_fraction
            prompt = _log_uniform(rng, self.long_prompt_tokens if is_long else self.short_prompt_tokens)
            trace.append(TraceRequest(round(now_s, 6), prompt, _log_uniform(rng, self.output_tokens)))
        return trace


def with_long_requests(trace: Iterable[TraceRequest], arrivals_s: Iterable[float],
                       prompt_tokens: tuple[int, int], output_tokens: tuple[int, int],
                       seed: int = 0) -> list[TraceRequest]:
    """The trace plus one long request at each of `arrivals_s`, lengths log-uniform within the ranges,
    sorted by arrival."""
    rng = random.Random(f"long:{seed}")
    added = [TraceRequest(round(t, 6), _log_uniform(rng, prompt_tokens), _log_uniform(rng, output_tokens))
             for t in arrivals_s]
    return sorted([*trace, *added], key=lambda r: r.arrival_s)


def _log_uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))
