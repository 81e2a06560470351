"""Prefix caching over worker processes (gloo on CPU) matches the single-process run without a
cache: under kvp=2 with 64-token groups a cached document spans both groups and is reused in place;
under pp=2 with sequence pipelining, requests reuse blocks while other chunks are in flight."""

from __future__ import annotations

import pytest

from mnemosyne import LLM, SamplingParams
from mnemosyne.engine.outputs import RequestOutput
from tests.engine.staggered import run_staggered
from tests.executor.parallel_checks import assert_same_outputs

GROUP = 64
NUM_NEW = 16
PARAMS = SamplingParams(max_tokens=NUM_NEW, logprobs=3, ignore_eos=True)
DOC = [(29 * j + 3) % 480 + 7 for j in range(100)]
# the document's KV lands on both groups of kvp=2 (100 + 5 + 16 tokens > 64)
FIRST = [[*DOC, 1, 2, 3, 4, 5], [9] * 20]
# the whole document again (across both groups), 90 and 40 of its tokens (a partly cached second
# shard; a short request on the first group), and an unrelated prompt
SECOND = [[*DOC, 6, 7], [*DOC[:90], 8] + [10] * 10, [*DOC[:40], 11, 12], [13] * 30]
ARRIVALS = [0, 0, 2, 3, 5, 8]
"""Engine steps at which FIRST + SECOND arrive the first time: while the document is still computed."""
ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=24, chunking="fixed:24", seed=0, device="cpu",
              dtype="float32")
LAYOUTS = {"kvp2": dict(kv_parallel_size=2, kvp_group_max_tokens=GROUP), "pp2": dict(pipeline_parallel_size=2)}


def _outputs(llm: LLM) -> list[RequestOutput]:
    """FIRST and SECOND interleaved, then SECOND again once nothing runs."""
    interleaved = run_staggered(llm.engine, FIRST + SECOND, ARRIVALS, PARAMS)
    return interleaved + llm.generate(SECOND, PARAMS, use_tqdm=False)


@pytest.fixture(scope="module")
def reference() -> list[RequestOutput]:
    llm = LLM("dummy:tiny", enable_prefix_caching=False, **ENGINE)
    try:
        return _outputs(llm)
    finally:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_with_prefix_caching_match_single_process_without_it(reference, layout):
    llm = LLM("dummy:tiny", **LAYOUTS[layout], **ENGINE)
    try:
        outputs = _outputs(llm)
        pool = llm.engine.scheduler.pool
        assert pool.num_free_blocks == pool.num_blocks
    finally:
        llm.engine.shutdown()
    assert_same_outputs([o.outputs[0] for o in reference], [o.outputs[0] for o in outputs], NUM_NEW)
    assert any(o.num_cached_tokens for o in outputs[2:6])  # hits while the document was being computed
    assert [o.num_cached_tokens for o in outputs[6:]] == [96, 96, 32, 16]  # the same prompts again: all but the last token, in whole blocks
