"""KV-cache parallelism over worker processes (gloo on CPU) gives the single-process run's tokens
exactly. With 64-token groups (--kvp-group-max-tokens) the long prompts span every group, several
multi-group requests share steps with short ones, and a seeded sampled request samples on its first
group. kvp=2, kvp=3, kvp=2 with tp=2, kvp=2 with pp=2, and all three axes (tp=2 × pp=2 × kvp=2). With
one stage, async scheduling plans decodes ahead: their tokens cross groups on the device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mnemosyne import LLM, SamplingParams
from mnemosyne.plan import StepPlan
from tests.executor.parallel_checks import assert_same_outputs

GROUP = 64
NUM_NEW = 32
GREEDY = SamplingParams(max_tokens=NUM_NEW, logprobs=3, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=NUM_NEW, temperature=0.8, seed=7, ignore_eos=True)
# prompt + 32 new tokens: 122 and 102 tokens span both groups of kvp=2; 182 and 153 all three of
# kvp=3; the others stay in one group (37, 55) or cross into a second one while decoding (72).
PROMPTS = {
    2: [list(range(3, 93)), [7] * 23, list(range(100, 170)), [1, 2, 3, 4, 5], list(range(200, 240))],
    3: [list(range(3, 153)), [7] * 23, list(range(100, 221)), [1, 2, 3, 4, 5], list(range(200, 240))],
}
PARAMS = [GREEDY, GREEDY, SAMPLED, GREEDY, GREEDY]
ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=24, chunking="fixed:24", seed=0, device="cpu")


def _generate(llm: LLM, prompts: list[list[int]]) -> tuple[list, list[StepPlan]]:
    """Outputs in prompt order, and every plan the scheduler made (`llm.ahead_step_ids`: those planned
    ahead, while the previous step ran)."""
    plans: list[StepPlan] = []
    llm.ahead_step_ids = set()  # type: ignore[attr-defined]
    schedule = llm.engine.scheduler.schedule

    def recording(ahead: bool = False) -> StepPlan:
        plans.append(schedule(ahead))
        if ahead:
            llm.ahead_step_ids.add(plans[-1].step_id)  # type: ignore[attr-defined]
        return plans[-1]

    llm.engine.scheduler.schedule = recording  # type: ignore[method-assign]
    try:
        return [o.outputs[0] for o in llm.generate(prompts, PARAMS, use_tqdm=False)], plans
    finally:
        llm.engine.scheduler.schedule = schedule  # type: ignore[method-assign]


def _run(num_prompts_kvp: int, **engine) -> tuple[list, list[StepPlan]]:
    llm = LLM("dummy:tiny", kvp_group_max_tokens=GROUP, **ENGINE, **engine)
    try:
        return _generate(llm, PROMPTS[num_prompts_kvp])
    finally:
        llm.engine.shutdown()


def _multi_group_chunks(plan: StepPlan) -> int:
    """Chunks whose tokens lie past the first group: their requests are active on several groups."""
    return sum(1 for c in plan.chunks if c.start + c.num_new_tokens > GROUP)


@pytest.fixture(scope="module")
def reference() -> dict[int, list]:
    llm = LLM("dummy:tiny", **ENGINE)
    try:
        return {kvp: _generate(llm, prompts)[0] for kvp, prompts in PROMPTS.items()}
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def kvp2() -> Iterator[LLM]:
    llm = LLM("dummy:tiny", kv_parallel_size=2, kvp_group_max_tokens=GROUP, **ENGINE)
    yield llm
    llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kvp2_matches_single_process(reference, kvp2):
    outputs, plans = _generate(kvp2, PROMPTS[2])
    assert_same_outputs(reference[2], outputs, NUM_NEW)
    assert max(_multi_group_chunks(p) for p in plans) >= 2
    # async scheduling: multi-group decodes planned ahead took their tokens from another group's sample
    ahead = [p for p in plans if p.step_id in kvp2.ahead_step_ids]
    assert max(_multi_group_chunks(p) for p in ahead) >= 2
    assert kvp2.engine.scheduler.pool.num_free_blocks == kvp2.engine.scheduler.pool.num_blocks


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kvp2_with_prefill_planned_ahead_matches_single_process(reference):
    """--async-prefill over worker processes (off by default with several devices): steps with prompt
    chunks planned ahead of the step in flight, their results sent from each output rank's thread."""
    llm = LLM("dummy:tiny", kv_parallel_size=2, kvp_group_max_tokens=GROUP, async_prefill=True, **ENGINE)
    try:
        outputs, plans = _generate(llm, PROMPTS[2])
        ahead = [p for p in plans if p.step_id in llm.ahead_step_ids]
    finally:
        llm.engine.shutdown()
    assert_same_outputs(reference[2], outputs, NUM_NEW)
    assert any(c.num_new_tokens > 1 for p in ahead for c in p.chunks)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_request_over_kvp_times_l_is_rejected_at_once(kvp2):
    with pytest.raises(ValueError, match=r"129 tokens, more than one request can hold: 2 KVP groups .* = 128"):
        kvp2.generate([list(range(3, 132))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not kvp2.engine.has_unfinished_requests()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kvp3_batches_several_multi_group_requests_with_short_ones(reference):
    outputs, plans = _run(3, kv_parallel_size=3)
    assert_same_outputs(reference[3], outputs, NUM_NEW)
    mixed = [p for p in plans if _multi_group_chunks(p) >= 2 and len(p.chunks) > _multi_group_chunks(p)]
    assert mixed  # steps with two or more multi-group requests and single-group ones
    assert any(c.start + c.num_new_tokens > 2 * GROUP for p in plans for c in p.chunks)  # a third group


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_kvp2_with_tp2_matches_single_process(reference):
    assert_same_outputs(reference[2], _run(2, kv_parallel_size=2, tensor_parallel_size=2)[0], NUM_NEW)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_kvp2_with_pp2_matches_single_process(reference):
    assert_same_outputs(reference[2], _run(2, kv_parallel_size=2, pipeline_parallel_size=2)[0], NUM_NEW)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_3d_tp2_pp2_kvp2_matches_single_process(reference):
    """The 8-GPU issue's layout on 8 CPU processes: every axis at once."""
    outputs = _run(2, kv_parallel_size=2, pipeline_parallel_size=2, tensor_parallel_size=2)[0]
    assert_same_outputs(reference[2], outputs, NUM_NEW)
