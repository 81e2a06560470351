"""The control plane's plan encoding: exact round trip, and a decode step's size and host time
independent of context length (1M tokens vs 1K, through the real scheduler, no model)."""

from __future__ import annotations

import time
from array import array

import pytest

from mnemosyne.executor import wire
from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan, StepResult, TokenLogprobs
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.policy import make_policy
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits

BLOCK_SIZE = 16


@pytest.mark.timeout(30)
def test_plan_round_trip_is_exact():
    params = SamplingParams(max_tokens=7, temperature=0.7, top_k=5, seed=3, stop=["x"], logprobs=2)
    plan = StepPlan(
        step_id=41,
        new_requests=(NewRequest("a", array("i", [1, 2, 3]), params, 2**40 + 5),),
        chunks=(ScheduledChunk("a", 0, 3, (7, 8), ()), ScheduledChunk("b", 1_000_000, 1, (), (42,)),
                ScheduledChunk("c", 17, 2, (2**30,), (5, 6))),
        freed_ids=("z", "y"),
    )
    decoded = wire.decode_plan(wire.encode_plan(plan))
    assert decoded == plan


@pytest.mark.timeout(30)
def test_result_and_errors_round_trip():
    result = StepResult(3, ("a", "b"), (5, 9), (None, TokenLogprobs(-0.5, (9, 1), (-0.5, -1.5))))
    assert wire.DECODERS[wire.KIND_RESULT].decode(wire.encode(result)) == result
    error = wire.WorkerError(2, "KeyError: 'a'", "Traceback ...")
    assert wire.DECODERS[wire.KIND_ERROR].decode(wire.encode(error)) == error


def _decode_plan_at(num_prompt_tokens: int, num_other_decodes: int = 7) -> StepPlan:
    """The plan of the first decode step after a single-step prefill of a num_prompt_tokens prompt,
    batched with a few short requests in decode, built by the real scheduler over a large pool."""
    num_blocks = (num_prompt_tokens + 64 * (num_other_decodes + 1)) // BLOCK_SIZE
    limits = SchedulerLimits(max_num_batched_tokens=num_prompt_tokens + 64 * num_other_decodes,
                             max_num_seqs=64, max_model_len=num_prompt_tokens + 64)
    scheduler = Scheduler(limits, BlockPool(num_blocks, BLOCK_SIZE), make_policy("fcfs"))
    params = SamplingParams(max_tokens=8)
    scheduler.add_request(Request("long", array("i", [7]) * num_prompt_tokens, params), seed=1)
    for i in range(num_other_decodes):
        scheduler.add_request(Request(f"short{i}", [3] * 20, params), seed=2)
    prefill = scheduler.schedule()
    assert prefill.new_requests and sum(c.num_new_tokens for c in prefill.chunks) == prefill.num_tokens
    ids = tuple(c.request_id for c in prefill.chunks)
    scheduler.update(prefill, StepResult(prefill.step_id, ids, (11,) * len(ids), (None,) * len(ids)))
    decode = scheduler.schedule()
    assert not decode.new_requests and all(c.num_new_tokens == 1 for c in decode.chunks)
    assert len(decode.chunks) == num_other_decodes + 1
    return decode


@pytest.mark.timeout(60)
def test_decode_step_size_does_not_grow_with_context():
    short, long = _decode_plan_at(1024), _decode_plan_at(1 << 20)
    assert next(c.start for c in long.chunks if c.request_id == "long") == 1 << 20
    short_bytes, long_bytes = wire.encode_plan(short), wire.encode_plan(long)
    assert len(long_bytes) == len(short_bytes)
    assert len(long_bytes) < 400  # 8 decodes: a few dozen bytes each
    assert wire.decode_plan(long_bytes) == long


@pytest.mark.timeout(60)
def test_decode_step_host_time_does_not_grow_with_context():
    short, long = _decode_plan_at(1024), _decode_plan_at(1 << 20)

    def round_trip_s(plan: StepPlan) -> float:
        start = time.perf_counter()
        for _ in range(200):
            wire.decode_plan(wire.encode_plan(plan))
        return (time.perf_counter() - start) / 200

    round_trip_s(short)  # warm up
    best_short = min(round_trip_s(short) for _ in range(3))
    best_long = min(round_trip_s(long) for _ in range(3))
    # A design that re-sent the prompt would be ~1000x slower here; allow generous timing noise.
    assert best_long < 3 * best_short + 50e-6
