"""Bounded load: 64 concurrent streaming clients x 4 requests each against the default model.

Every request must stream exactly the tokens and text a solo run gives, and /metrics must count
exactly what the clients saw. Prints client-side p50/p99 TTFT and TBT.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from tests.server.harness import MODEL, Server

# Generous: on an idle 2-core CPU this takes ~1-2 min, but a shared, overloaded box can take 6+.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_CLIENTS = 64
REQUESTS_PER_CLIENT = 4
MAX_TOKENS = 8
PROMPTS = [
    "The capital of France is", "Water boils at", "The largest planet is", "Once upon a time,",
    "def fibonacci(n):", "The opposite of hot is", "My favourite fruit is", "In 1969, humans",
]


@dataclass
class Streamed:
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)


async def _stream(client: httpx.AsyncClient, server: Server, prompt: str) -> Streamed:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    out = Streamed()
    start_s = last_s = time.monotonic()
    async with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return out
            chunk = json.loads(line.removeprefix("data: "))
            out.usage = chunk.get("usage") or out.usage
            for choice in chunk["choices"]:
                now_s = time.monotonic()
                tokens = choice["logprobs"]["tokens"] if choice["logprobs"] else []
                if tokens and out.ttft_s is None:
                    out.ttft_s = now_s - start_s
                elif tokens:
                    out.gaps_s.append(now_s - last_s)
                    out.gaps_s.extend([0.0] * (len(tokens) - 1))
                if tokens:
                    last_s = now_s
                out.tokens += tokens
                out.text += choice["text"]
                out.finish_reason = choice["finish_reason"] or out.finish_reason
    raise AssertionError("the stream ended without [DONE]")


async def _client(client: httpx.AsyncClient, server: Server, k: int) -> list[tuple[int, Streamed]]:
    results = []
    for i in range(REQUESTS_PER_CLIENT):
        p = (k + i) % len(PROMPTS)
        results.append((p, await _stream(client, server, PROMPTS[p])))
    return results


async def _run(server: Server) -> tuple[list[Streamed], list[tuple[int, Streamed]], dict, dict, float]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 8, max_keepalive_connections=NUM_CLIENTS + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        solo = [await _stream(client, server, p) for p in PROMPTS]
        before = server.metrics()
        start_s = time.monotonic()
        per_client = await asyncio.gather(*(_client(client, server, k) for k in range(NUM_CLIENTS)))
        wall_s = time.monotonic() - start_s
    return solo, [r for results in per_client for r in results], before, server.metrics(), wall_s


def test_64_concurrent_streaming_clients(server: Server):
    solo, results, before, after, wall_s = asyncio.run(_run(server))
    assert len(results) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    for p, out in results:
        ref = solo[p]
        assert out.tokens == ref.tokens, f"prompt {p}: tokens differ from the solo run"
        assert out.text == ref.text and out.finish_reason == ref.finish_reason
        assert out.usage["completion_tokens"] == len(out.tokens) == len(ref.tokens)
        assert out.usage["prompt_tokens"] == ref.usage["prompt_tokens"]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    n = len(results)
    assert delta("mnemosyne_prompt_tokens_total") == sum(o.usage["prompt_tokens"] for _, o in results)
    assert delta("mnemosyne_generation_tokens_total") == sum(o.usage["completion_tokens"] for _, o in results)
    assert delta("mnemosyne_e2e_request_latency_seconds_count") == n
    assert delta("mnemosyne_time_to_first_token_seconds_count") == n
    finished = sum(delta(f'mnemosyne_requests_finished_total{{finish_reason="{r}"}}') for r in ("stop", "length"))
    assert finished == n
    assert delta("mnemosyne_time_between_tokens_seconds_count") == sum(len(o.tokens) - 1 for _, o in results)
    assert after["mnemosyne_kv_cache_usage_ratio"] == 0.0

    ttft_ms = np.array([o.ttft_s for _, o in results]) * 1e3
    tbt_ms = np.array([g for _, o in results for g in o.gaps_s]) * 1e3
    num_tokens = sum(len(o.tokens) for _, o in results)
    print(f"\nload: {n} requests ({NUM_CLIENTS} concurrent streaming clients), {num_tokens} tokens in "
          f"{wall_s:.1f} s ({num_tokens / wall_s:.1f} tok/s)\n"
          f"  TTFT p50 {np.percentile(ttft_ms, 50):.0f} ms, p99 {np.percentile(ttft_ms, 99):.0f} ms\n"
          f"  TBT  p50 {np.percentile(tbt_ms, 50):.0f} ms, p99 {np.percentile(tbt_ms, 99):.0f} ms\n"
          f"  mean engine batch {delta('mnemosyne_step_batch_requests_sum') / delta('mnemosyne_step_batch_requests_count'):.1f} "
          f"requests, mean step {1e3 * delta('mnemosyne_step_duration_seconds_sum') / delta('mnemosyne_step_duration_seconds_count'):.0f} ms")
