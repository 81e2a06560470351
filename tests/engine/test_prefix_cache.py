"""Prefix caching through the real engine: requests that share prefixes of different lengths,
arriving interleaved, give the same greedy tokens and logprobs with the cache on as with it off,
also when a tiny cache forces evictions and preemptions; the reused tokens are reported."""

from __future__ import annotations

import pytest

from mnemosyne import LLM
from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.outputs import RequestOutput
from mnemosyne.request import SamplingParams
from tests.engine.staggered import run_staggered
from tests.executor.parallel_checks import assert_same_outputs

NUM_NEW = 12
PARAMS = SamplingParams(max_tokens=NUM_NEW, logprobs=3, ignore_eos=True)
DOC = [(13 * j + 5) % 500 + 3 for j in range(150)]
# (shared length, own suffix): prefixes of 0 to 150 tokens, some the whole document
SHARES = [(150, [7, 8, 9]), (17, [40, 41]), (150, [10]), (64, [50] * 9), (100, [60, 61, 62]),
          (0, [70] * 30), (150, [7, 8, 9, 11]), (33, [80]), (100, [60, 61, 62]), (130, [90] * 20)]
PROMPTS = [DOC[:n] + suffix for n, suffix in SHARES]
ARRIVALS = [0, 0, 2, 3, 3, 5, 9, 14, 30, 31]
"""Engine step at which each prompt arrives: some while the prompts they share with still run, some
after those finished."""
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # dummy:tiny: layers × (k, v) × kv heads × head_dim × fp32


def make_engine(is_caching: bool, num_blocks: int | None = None) -> LLMEngine:
    memory = 0.01 if num_blocks is None else num_blocks * 16 * KV_BYTES_PER_TOKEN / 2**30
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", max_num_batched_tokens=24,
                                    chunking="fixed:24", kv_cache_memory=memory,
                                    enable_prefix_caching=is_caching, scheduler="fcfs"))
    assert num_blocks is None or engine.scheduler.pool.num_blocks == num_blocks
    return engine


@pytest.fixture(scope="module")
def uncached() -> list[RequestOutput]:
    return run_staggered(make_engine(is_caching=False), PROMPTS, ARRIVALS, PARAMS)


def test_interleaved_requests_sharing_prefixes_match_the_uncached_run(uncached):
    engine = make_engine(is_caching=True)
    cached = run_staggered(engine, PROMPTS, ARRIVALS, PARAMS)
    assert_same_outputs([o.outputs[0] for o in uncached], [o.outputs[0] for o in cached], NUM_NEW)
    assert all(o.num_cached_tokens == 0 for o in uncached)
    hits = [o.num_cached_tokens for o in cached]
    # FCFS, so the order does not hang on wall-clock slack: the first arrival takes the whole step, and
    # the second, arriving with it, is admitted a step later onto the first's one finished block
    assert hits[:2] == [0, 16]
    assert hits[2] > 0  # arrived while the request it shares with was still computing the document
    assert hits[6] == 144 and hits[8] == 96  # the most whole blocks they can reuse (96: the same prompt again)
    assert all(h % 16 == 0 and h <= n for h, (n, _) in zip(hits, SHARES, strict=True))
    pool = engine.scheduler.pool
    assert pool.num_hit_tokens == sum(hits) and pool.num_queried_tokens == sum(map(len, PROMPTS))
    assert pool.num_free_blocks == pool.num_blocks


def test_eviction_and_preemption_in_a_tiny_cache_keep_outputs_exact(uncached):
    engine = make_engine(is_caching=True, num_blocks=14)  # the longest request needs 11 blocks of 16
    cached = run_staggered(engine, PROMPTS, ARRIVALS, PARAMS)
    assert_same_outputs([o.outputs[0] for o in uncached], [o.outputs[0] for o in cached], NUM_NEW)
    pool = engine.scheduler.pool
    assert pool.num_evicted_blocks > 0 and engine.scheduler.num_preemptions > 0
    assert pool.num_hit_tokens > 0
    assert pool.num_free_blocks == pool.num_blocks


def test_a_document_asked_twice_reuses_its_kv():
    question_1, question_2 = [11] * 20, [12] * 25
    reference = LLM("dummy:tiny", device="cpu", dtype="float32", enable_prefix_caching=False)
    llm = LLM("dummy:tiny", device="cpu", dtype="float32")
    try:
        assert llm.engine.config.enable_prefix_caching  # on by default
        expected = [reference.generate(DOC + q, PARAMS, use_tqdm=False)[0] for q in (question_1, question_2)]
        first, second = (llm.generate(DOC + q, PARAMS, use_tqdm=False)[0] for q in (question_1, question_2))
    finally:
        reference.engine.shutdown()
        llm.engine.shutdown()
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 144)
    assert_same_outputs([o.outputs[0] for o in expected], [first.outputs[0], second.outputs[0]], NUM_NEW)
