"""Prefix caching in the API: OpenAI's `usage.prompt_tokens_details.cached_tokens` and the Prometheus
counters of hit tokens and evictions."""

from __future__ import annotations

import openai
import pytest

from mnemosyne.engine.core_wire import Delta, Stats
from mnemosyne.metrics.prometheus import ServerMetrics
from mnemosyne.server.responses import Choice, usage
from tests.server.harness import API_KEY, MODEL, SECRET, Server


def test_usage_counts_cached_tokens_once_per_prompt():
    choices = [Choice(0, "r-0", 0, 100), Choice(1, "r-1", 0, 100), Choice(2, "r-2", 1, 40)]
    for choice, cached in zip(choices, (96, 0, 32), strict=True):
        choice.add(Delta(choice.request_id, "x", [5], None, "stop", cached))
    assert usage(choices) == {"prompt_tokens": 140, "completion_tokens": 3, "total_tokens": 143,
                              "prompt_tokens_details": {"cached_tokens": 96 + 32}}


def test_prefix_counters_grow_by_the_cores_running_totals():
    metrics = ServerMetrics()
    for queried, hit, evicted in ((100, 0, 0), (300, 160, 2), (300, 160, 2), (350, 192, 5)):
        metrics.observe_stats(Stats(0, 0, 0, 0, 0.0, 0.0, 0, 0, queried, hit, evicted))
    text = metrics.render().decode()
    assert "mnemosyne_prefix_cache_queried_tokens_total 350.0" in text
    assert "mnemosyne_prefix_cache_hit_tokens_total 192.0" in text
    assert "mnemosyne_prefix_cache_evicted_blocks_total 5.0" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_document_asked_twice_reports_cached_tokens(server: Server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    document = f"{SECRET} inventory. " + " ".join(f"Shelf {i} holds {i * 7 % 13} boxes." for i in range(40))
    before = server.metrics()
    first = client.completions.create(model=MODEL, prompt=f"{document} Which shelf is empty?", max_tokens=2,
                                      temperature=0)
    stream = client.completions.create(model=MODEL, prompt=f"{document} How many boxes in all?", max_tokens=2,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    second = list(stream)[-1].usage
    after = server.metrics()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > 0.8 * first.usage.prompt_tokens and cached % 16 == 0 and cached < second.prompt_tokens

    def grown(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grown("mnemosyne_prefix_cache_hit_tokens_total") >= cached
    assert grown("mnemosyne_prefix_cache_queried_tokens_total") >= first.usage.prompt_tokens + second.prompt_tokens
    assert "mnemosyne_prefix_cache_evicted_blocks_total" in after
