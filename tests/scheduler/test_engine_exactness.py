"""The SLO-aware scheduler through the real engine: LARS ordering, adaptive chunks sized by a tight
TBT budget, budget yielding, per-request deadlines and preemption in a tiny cache must still give
HF's greedy tokens."""

from __future__ import annotations

import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams
from tests.reference import hf_greedy, save_tiny

NUM_NEW = 24
PROMPTS = [[(5 * i + 11 * j) % 380 + 3 for j in range(n)] for i, n in enumerate((90, 7, 150, 33, 2, 64, 120, 12))]
KV_BYTES_PER_TOKEN = 3 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head_dim × fp32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-slo")
    hf = save_tiny(path, "llama-gqa-untied")
    return path, [hf_greedy(hf, p, NUM_NEW) for p in PROMPTS]


def test_lars_with_adaptive_chunks_and_preemption_matches_hf(checkpoint):
    path, expected = checkpoint
    num_blocks = 16  # the longest request needs 11 blocks of 16; all of them together ~60
    engine = LLMEngine(EngineConfig(
        model=str(path), device="cpu", dtype="float32", scheduler="lars", chunking="adaptive",
        roofline_device="cpu", tbt_slo_ms=2.5, ttft_slo_ms=50.0, max_num_batched_tokens=96,
        kv_cache_memory=num_blocks * 16 * KV_BYTES_PER_TOKEN / 2**30))
    assert engine.scheduler.pool.num_blocks == num_blocks
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    arrivals = [0, 0, 1, 2, 2, 5, 9, 9]
    ids, done, chunk_sizes, step = [""] * len(PROMPTS), {}, set(), 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i, at in enumerate(arrivals):
            if at == step:  # some requests bring their own deadline or priority
                ids[i] = engine.add_request(PROMPTS[i], params, priority=-1 if i == 3 else 0,
                                            deadline_s=0.01 if i == 6 else None)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if engine.last_plan is not None:
            chunk_sizes.update(c.num_new_tokens for c in engine.last_plan.chunks)
        step += 1
    assert [done[i] for i in ids] == expected
    assert engine.scheduler.num_preemptions > 0
    assert any(1 < n < 96 and n % 32 == 0 for n in chunk_sizes)  # the time budget cut some chunks
    assert engine.scheduler.pool.num_free_blocks == num_blocks
