"""Scheduler unit tests: small factories, a fake clock, no model."""

from __future__ import annotations

import pytest

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.plan import StepPlan, StepResult
from mnemosyne.request import FinishReason, Request, SamplingParams
from mnemosyne.scheduler.policy import FCFS
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=1024):
    clock = FakeClock()
    sched = Scheduler(SchedulerLimits(budget, max_seqs, max_len), BlockPool(num_blocks, block_size), FCFS(), clock)
    return sched, clock


def add(sched: Scheduler, clock: FakeClock, rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                  arrival_s=clock.now_s)
    sched.add_request(req, seed=0)
    clock.now_s += 1.0
    return req


def finish_step(sched: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """Land a step as a worker would: every chunk that reaches its request's last token samples."""
    sampled = [c.request_id for c in plan.chunks
               if c.start + c.num_new_tokens == sched.requests[c.request_id].num_tokens]
    sched.update(plan, StepResult(plan.step_id, tuple(sampled), (token,) * len(sampled), (None,) * len(sampled)))


def test_prompt_is_chunked_to_the_budget_and_sent_once():
    sched, clock = make_scheduler(budget=16)
    add(sched, clock, "a", 40)
    plans = []
    for _ in range(3):
        plans.append(sched.schedule())
        finish_step(sched, plans[-1])
    assert [c.num_new_tokens for p in plans for c in p.chunks] == [16, 16, 8]
    assert [c.start for p in plans for c in p.chunks] == [0, 16, 32]
    assert len(plans[0].new_requests) == 1 and not plans[1].new_requests and not plans[2].new_requests
    assert list(plans[0].new_requests[0].token_ids) == list(range(1, 41))
    # the first token was sampled at the end of the prompt; the next step is a 1-token decode
    decode = sched.schedule()
    assert decode.chunks[0].num_new_tokens == 1 and decode.chunks[0].new_token_ids == (7,)


def test_a_prompt_whose_kv_was_written_beforehand_is_admitted_computed():
    """The benchmarks' random-KV mode marks a prompt computed before its first step: admission keeps
    that (only the last token runs) and still gives the request blocks for the whole prompt."""
    sched, clock = make_scheduler(num_blocks=64, block_size=4, budget=16)
    req = add(sched, clock, "a", 40)
    req.num_computed_tokens = 39
    plan = sched.schedule()
    assert [(c.start, c.num_new_tokens) for c in plan.chunks] == [(39, 1)]
    assert len(req.block_ids) == 10


def test_decodes_go_first_and_prefill_takes_what_is_left():
    sched, clock = make_scheduler(budget=10)
    add(sched, clock, "a", 3)
    finish_step(sched, sched.schedule())  # a is now decoding
    add(sched, clock, "b", 30)
    plan = sched.schedule()
    assert [(c.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 1), ("b", 9)]


def test_stall_free_decode_is_never_starved_by_a_long_prefill():
    sched, clock = make_scheduler(budget=8, num_blocks=256)
    short = add(sched, clock, "short", 2)
    finish_step(sched, sched.schedule())  # short is decoding now
    add(sched, clock, "long", 200)
    for _ in range(7):
        plan = sched.schedule()
        assert plan.num_tokens == 8
        assert (plan.chunks[0].request_id, plan.chunks[0].num_new_tokens) == ("short", 1)
        finish_step(sched, plan)
    assert short.finish_reason == FinishReason.LENGTH and short.num_output_tokens == 8
    assert sched.requests["long"].num_computed_tokens == 7 * 7


def test_preemption_frees_the_least_urgent_and_recomputes_it():
    sched, clock = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = add(sched, clock, "a", 8, max_tokens=16)
    b = add(sched, clock, "b", 8, max_tokens=16)
    finish_step(sched, sched.schedule())  # both prefilled: 2 + 2 blocks + 1 token each
    preempted_at = None
    for step in range(40):
        plan = sched.schedule()
        if "b" in plan.freed_ids or b in sched.waiting:
            preempted_at = preempted_at or step
        finish_step(sched, plan)
        if not sched.has_unfinished:
            break
    assert preempted_at is not None and sched.num_preemptions >= 1
    assert b.metrics.num_preemptions >= 1 and a.metrics.num_preemptions == 0
    assert a.finish_reason == b.finish_reason == FinishReason.LENGTH
    assert a.num_output_tokens == b.num_output_tokens == 16
    assert sched.pool.num_free_blocks == 6


def test_preempted_request_is_resent_whole_after_its_state_was_freed():
    sched, clock = make_scheduler(num_blocks=5, block_size=4, budget=64)
    add(sched, clock, "a", 8, max_tokens=12)
    add(sched, clock, "b", 8, max_tokens=12)
    finish_step(sched, sched.schedule())
    resent = None
    for _ in range(40):
        plan = sched.schedule()
        resent = resent or next((n for n in plan.new_requests if n.request_id == "b"), None)
        if resent is not None:
            # b's worker state was dropped earlier; it comes back with prompt + outputs so far
            assert len(resent.token_ids) > 8
            break
        finish_step(sched, plan)
    assert resent is not None


def test_requests_that_can_never_run_are_rejected_at_once():
    sched, clock = make_scheduler(num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(ValueError, match="empty"):
        add(sched, clock, "e", 0)
    with pytest.raises(ValueError, match="KV cache"):
        add(sched, clock, "big", 17)
    sched2, clock2 = make_scheduler(max_len=10)
    with pytest.raises(ValueError, match="max_model_len"):
        add(sched2, clock2, "long", 11)
    assert not sched.has_unfinished and not sched2.has_unfinished


def test_abort_frees_blocks_at_once_and_tells_the_workers():
    sched, clock = make_scheduler()
    add(sched, clock, "a", 10)
    finish_step(sched, sched.schedule())
    assert sched.pool.num_free_blocks < 64
    [req] = sched.abort(["a", "unknown"])
    assert req.finish_reason == FinishReason.ABORT
    assert sched.pool.num_free_blocks == 64
    assert sched.schedule().freed_ids == ("a",)


def test_generation_stops_at_the_cache_capacity_with_length():
    sched, clock = make_scheduler(num_blocks=3, block_size=4, budget=64)
    req = add(sched, clock, "a", 10, max_tokens=100)
    for _ in range(10):
        finish_step(sched, sched.schedule())
    assert req.finish_reason == FinishReason.LENGTH and req.num_tokens == 12


def test_a_decode_step_carries_no_context():
    for prompt_len in (1_000, 100_000):
        sched, clock = make_scheduler(num_blocks=prompt_len // 4 + 8, budget=1 << 20, max_len=1 << 20)
        add(sched, clock, "a", prompt_len)
        finish_step(sched, sched.schedule())
        decode = sched.schedule()
        assert not decode.new_requests
        [chunk] = decode.chunks
        assert (chunk.start, chunk.num_new_tokens, chunk.new_token_ids) == (prompt_len, 1, (7,))
        assert len(chunk.new_block_ids) <= 1


# -- async scheduling: decodes planned ahead of the step that samples their token ----------------------
def test_a_decode_is_planned_ahead_of_the_step_that_samples_its_token():
    sched, clock = make_scheduler(budget=16)
    a = add(sched, clock, "a", 10, max_tokens=4)
    assert not sched.can_schedule_ahead()  # nothing in flight yet
    first = sched.schedule()
    assert [(c.start, c.num_new_tokens) for c in first.chunks] == [(0, 10)]
    assert sched.can_schedule_ahead()
    ahead = sched.schedule(ahead=True)
    # position 10 is the token `first` is sampling: no id in the plan, the workers take it on the device
    assert [(c.start, c.num_new_tokens, c.new_token_ids) for c in ahead.chunks] == [(10, 1, ())]
    assert a.num_computed_tokens + a.num_inflight_tokens == a.num_tokens + 1
    assert a.num_uncomputed_tokens == 0
    assert not sched.can_schedule_ahead()  # one step ahead at most
    finish_step(sched, first, token=5)
    assert list(a.token_ids[10:]) == [5] and a.num_computed_tokens == 10
    following = sched.schedule(ahead=True)  # planned while `ahead` runs; the sampled 5 rides along now
    assert [(c.start, c.new_token_ids) for c in following.chunks] == [(11, (5,))]
    finish_step(sched, ahead, token=6)
    finish_step(sched, following, token=8)
    assert list(a.token_ids[10:]) == [5, 6, 8] and a.num_computed_tokens == 12


def test_a_step_with_prompt_chunks_is_planned_ahead_around_the_decodes_in_flight():
    """--async-prefill: ahead of a step in flight, a long prompt's next chunk, a decode of the token that
    step samples (decodes first) and a request that arrived meanwhile, in one plan; the same tokens
    land as in lockstep."""
    sched, clock = make_scheduler(budget=16)
    a = add(sched, clock, "a", 6, max_tokens=4)
    long = add(sched, clock, "long", 40, max_tokens=2)
    first = sched.schedule()
    assert [(c.request_id, c.start, c.num_new_tokens) for c in first.chunks] == [("a", 0, 6), ("long", 0, 10)]
    assert not sched.can_schedule_ahead()  # decodes alone: the long prompt's next chunk waits ...
    sched.stage_cleared(first)
    assert sched.can_schedule_ahead(with_chunks=True)  # ... unless chunks may be planned ahead
    add(sched, clock, "b", 3)
    ahead = sched.schedule(ahead=True)
    assert [(c.request_id, c.start, c.num_new_tokens, c.new_token_ids) for c in ahead.chunks] == [
        ("a", 6, 1, ()), ("long", 10, 15, ())]  # b does not fit the 16 tokens
    assert not ahead.new_requests
    finish_step(sched, first, token=5)
    assert list(a.token_ids[6:]) == [5]
    sched.stage_cleared(ahead)
    following = sched.schedule(ahead=True)
    assert [(c.request_id, c.start, c.num_new_tokens) for c in following.chunks] == [
        ("a", 7, 1), ("long", 25, 15)]
    finish_step(sched, ahead, token=6)
    finish_step(sched, following, token=8)
    assert list(a.token_ids[6:]) == [5, 6, 8] and long.num_computed_tokens == 40
    last = sched.schedule()
    assert [(c.request_id, c.start, c.num_new_tokens) for c in last.chunks] == [("a", 8, 1), ("long", 40, 1),
                                                                                ("b", 0, 3)]


def test_without_the_stage_cleared_a_prompt_chunk_is_not_planned_ahead():
    sched, clock = make_scheduler(budget=8)
    add(sched, clock, "long", 20)
    sched.schedule()
    assert [c.request_id for c in sched.schedule(ahead=True).chunks] == []


def test_no_decode_is_planned_ahead_past_max_tokens():
    sched, clock = make_scheduler(budget=16)
    a = add(sched, clock, "a", 6, max_tokens=2)
    plan = sched.schedule()
    ahead = sched.schedule(ahead=True)  # the first sample leaves one token to go: its decode may run ahead
    assert len(ahead.chunks) == 1
    assert not sched.can_schedule_ahead()
    finish_step(sched, plan)
    assert not sched.can_schedule_ahead()  # the sample in flight is the last one
    assert sched.schedule(ahead=True).chunks == ()
    finish_step(sched, ahead)
    assert a.is_finished and a.finish_reason == FinishReason.LENGTH
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_a_step_ahead_of_a_request_that_stops_is_discarded():
    sched, _ = make_scheduler(budget=16)
    req = Request("a", list(range(1, 7)), SamplingParams(max_tokens=8), eos_token_ids=(2,), arrival_s=0.0)
    sched.add_request(req, seed=0)
    plan = sched.schedule()
    ahead = sched.schedule(ahead=True)
    finish_step(sched, plan, token=2)  # end of sequence: the decode in flight computes a token nobody wants
    assert req.is_finished and req.finish_reason == FinishReason.STOP
    sched.update(ahead, StepResult(ahead.step_id, ("a",), (9,), (None,)))
    assert list(req.token_ids[6:]) == [2]
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not sched.has_unfinished
    assert sched.schedule().freed_ids == ("a",)  # the workers drop it after the step ahead ran


def test_nothing_is_planned_ahead_while_prompt_work_waits():
    sched, clock = make_scheduler(budget=16)
    add(sched, clock, "a", 6)
    plan = sched.schedule()
    add(sched, clock, "b", 30)  # arrives while the first step runs: the next step waits for its landing
    assert not sched.can_schedule_ahead()
    finish_step(sched, plan)
    nxt = sched.schedule()
    assert {c.request_id for c in nxt.chunks} == {"a", "b"}
    assert not sched.can_schedule_ahead()  # b's prompt is not fully dispatched


def test_a_decode_that_opens_the_next_kvp_group_waits_for_its_token():
    from mnemosyne.kv.kvp_placement import KvpPlacement
    from mnemosyne.scheduler.factory import kvp_group_boundary

    clock = FakeClock()
    sched = Scheduler(SchedulerLimits(64, 8, 1024), KvpPlacement(2, 16, 4, group_max_tokens=16), FCFS(), clock,
                      group_boundary=kvp_group_boundary(16))
    req = Request("a", list(range(1, 17)), SamplingParams(max_tokens=8, ignore_eos=True), arrival_s=0.0)
    sched.add_request(req, seed=0)
    plan = sched.schedule()  # positions 0-15 fill the first group: the sample, position 16, opens the second
    assert not sched.can_schedule_ahead()
    finish_step(sched, plan)
    decode = sched.schedule()
    assert [(c.start, c.num_new_tokens) for c in decode.chunks] == [(16, 1)]
    assert sched.can_schedule_ahead()  # position 17 is in the second group too, beside 16
