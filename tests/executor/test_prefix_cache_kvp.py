"""Prefix caching under KV-cache parallelism over worker processes (gloo on CPU): with 64-token
groups a cached document spans both groups of kvp=2 and is reused in place, and every output
matches the single-process run without a cache."""

from __future__ import annotations

import pytest

from mnemosyne import LLM, SamplingParams
from tests.executor.parallel_checks import assert_same_outputs

GROUP = 64
NUM_NEW = 16
PARAMS = SamplingParams(max_tokens=NUM_NEW, logprobs=3, ignore_eos=True)
DOC = [(29 * j + 3) % 480 + 7 for j in range(100)]
# asked first: the document's KV lands on both groups (100 + 5 + 16 tokens > 64)
FIRST = [[*DOC, 1, 2, 3, 4, 5], [9] * 20]
# then, together: the whole document again (across both groups), 90 and 40 of its tokens (a partial
# second shard; a short request on the first group), and an unrelated prompt
SECOND = [[*DOC, 6, 7], [*DOC[:90], 8] + [10] * 10, [*DOC[:40], 11, 12], [13] * 30]
ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=24, chunking="fixed:24", seed=0, device="cpu",
              dtype="float32")


def _generate_twice(llm: LLM) -> list:
    outs = llm.generate(FIRST, PARAMS, use_tqdm=False)
    return outs + llm.generate(SECOND, PARAMS, use_tqdm=False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kvp2_reuses_a_prefix_across_groups_and_matches_single_process_without_cache():
    reference_llm = LLM("dummy:tiny", enable_prefix_caching=False, **ENGINE)
    try:
        reference = _generate_twice(reference_llm)
    finally:
        reference_llm.engine.shutdown()
    llm = LLM("dummy:tiny", kv_parallel_size=2, kvp_group_max_tokens=GROUP, **ENGINE)
    try:
        outputs = _generate_twice(llm)
        pool = llm.engine.scheduler.pool
        assert pool.num_free_blocks == pool.num_blocks
    finally:
        llm.engine.shutdown()
    assert_same_outputs([o.outputs[0] for o in reference], [o.outputs[0] for o in outputs], NUM_NEW)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 96, 80, 32, 0]
