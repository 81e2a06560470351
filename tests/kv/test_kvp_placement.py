"""KVP placement in the scheduler: group onboarding, reservation at admission, clear limits. No model."""

from __future__ import annotations

import random

import pytest

from mnemosyne.kv import kvp_placement
from mnemosyne.kv.kvp_placement import KvpPlacement
from mnemosyne.plan import StepPlan
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.factory import kvp_group_boundary
from mnemosyne.scheduler.policy import FCFS
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits
from tests.scheduler.factories import FakeClock, land

L = 64
BLOCK = 16


def kvp_scheduler(num_groups: int, blocks_per_group: int = 64, budget: int = 48, group_max_tokens: int = L,
                  max_seqs: int = 64) -> Scheduler:
    placement = KvpPlacement(num_groups, blocks_per_group, BLOCK, group_max_tokens)
    return Scheduler(SchedulerLimits(budget, max_seqs, 1 << 20), placement, FCFS(), FakeClock(),
                     group_boundary=kvp_group_boundary(placement.group_max_tokens))


def add(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    req = Request(rid, [5] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_s=0.0)
    sched.add_request(req, seed=0)
    return req


def run(sched: Scheduler, max_steps: int = 1000) -> list[StepPlan]:
    plans = []
    while sched.has_unfinished and len(plans) < max_steps:
        plans.append(sched.schedule())
        land(sched, plans[-1])
    assert not sched.has_unfinished
    return plans


def test_groups_are_onboarded_as_the_prefix_crosses_each_multiple_of_l():
    sched = kvp_scheduler(num_groups=4)
    add(sched, "long", 200, max_tokens=8)  # 208 tokens: 4 groups of 64
    steps = []
    for _ in range(12):
        plan = sched.schedule()
        (chunk,) = plan.chunks
        end = chunk.start + chunk.num_new_tokens
        steps.append((chunk.start, end, len(sched.pool.active_group_ids("long", end))))
        land(sched, plan)
    # 48-token chunks, clipped at 64, 128, 192; decodes append to the last group
    assert steps == [(0, 48, 1), (48, 64, 1), (64, 112, 2), (112, 128, 2), (128, 176, 3), (176, 192, 3),
                     (192, 200, 4), (200, 201, 4), (201, 202, 4), (202, 203, 4), (203, 204, 4), (204, 205, 4)]
    assert sorted(sched.pool.group_ids("long")) == [0, 1, 2, 3]


def test_blocks_come_from_the_group_of_their_shard():
    sched = kvp_scheduler(num_groups=3)
    req = add(sched, "long", 150, max_tokens=20)  # 170 tokens: 3 groups
    for _ in range(6):
        land(sched, sched.schedule())
    groups = sched.pool.group_ids("long")
    per_shard = L // BLOCK
    for i, block in enumerate(req.block_ids):
        assert block // sched.pool.blocks_per_group == groups[i // per_shard]


def test_a_long_prompt_claims_a_run_in_each_group_until_it_is_freed(monkeypatch):
    monkeypatch.setattr(kvp_placement, "RUN_MIN_TOKENS", 150)
    sched = kvp_scheduler(num_groups=3)
    long = add(sched, "long", 150, max_tokens=4)  # 154 tokens: shards of 4, 4 and 2 blocks
    add(sched, "chat", 40, max_tokens=30)  # a short prompt: no claim
    plan = sched.schedule()  # the budget of 48 goes to the long prompt's first chunk
    groups = sched.pool.group_ids("long")
    claims = []
    while sched.has_unfinished:
        land(sched, plan)
        claims.append({g: {o: (r.start, r.stop) for o, r in pool._claims.items()}
                       for g, pool in enumerate(sched.pool.pools) if pool._claims})
        plan = sched.schedule()
    # each shard's prompt blocks claimed as one run at the bottom of its group, dropped with the request
    assert {groups[0]: {"long": (0, 4)}, groups[1]: {"long": (0, 4)}, groups[2]: {"long": (0, 2)}} in claims
    assert long.is_finished and claims[-1] == {}


def test_a_long_request_reserves_all_its_groups_at_admission():
    sched = kvp_scheduler(num_groups=3, blocks_per_group=8)
    add(sched, "long", 100, max_tokens=60)  # 160 tokens: 4 + 4 + 2 blocks
    plan = sched.schedule()
    assert plan.chunks[0].num_new_tokens == 48  # only the first chunk's blocks are allocated ...
    groups = sched.pool.group_ids("long")
    # ... but the rest is promised: nobody else can take it
    assert [sched.pool.available_blocks(g) for g in groups] == [4, 4, 6]


def test_two_long_requests_that_fit_only_one_at_a_time_run_in_order_without_deadlock():
    # Each group holds exactly L tokens; each request needs 2 groups (4 + 3 blocks of 8 in all). Taking
    # blocks lazily, both would start and then wait on each other; reserved, the second waits its turn.
    sched = kvp_scheduler(num_groups=2, blocks_per_group=L // BLOCK)
    first, second = add(sched, "first", 100), add(sched, "second", 100)
    plans = run(sched)
    first_done = next(i for i, p in enumerate(plans) if "first" in p.freed_ids)
    second_start = next(i for i, p in enumerate(plans) if any(c.request_id == "second" for c in p.chunks))
    assert second_start >= first_done  # admitted only once the first one has given its blocks back
    assert first.num_output_tokens == second.num_output_tokens == 8
    assert first.metrics.num_preemptions == second.metrics.num_preemptions == 0
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_short_requests_spread_over_all_groups():
    sched = kvp_scheduler(num_groups=3, budget=512)
    for i in range(6):
        add(sched, f"short-{i}", 20)
    sched.schedule()
    assert sorted(sched.pool.group_ids(f"short-{i}")[0] for i in range(6)) == [0, 0, 1, 1, 2, 2]


def test_requests_over_kvp_times_l_are_rejected_at_once_with_the_limit():
    sched = kvp_scheduler(num_groups=2)
    with pytest.raises(ValueError, match=r"129 tokens, more than one request can hold: 2 KVP groups .* × 64 .* = 128"):
        add(sched, "too-long", 129)
    assert not sched.has_unfinished
    req = add(sched, "fits", 120, max_tokens=50)  # the prompt fits; its output is cut at 128 tokens
    run(sched)
    assert req.num_tokens == 128 and req.finish_reason == "length"


def test_group_max_tokens_is_a_multiple_of_the_block_and_at_most_a_group():
    with pytest.raises(ValueError, match="multiple of --block-size"):
        KvpPlacement(2, 8, BLOCK, 40)
    assert KvpPlacement(2, 8, BLOCK, 1024).group_max_tokens == 8 * BLOCK
    assert KvpPlacement(2, 8, BLOCK).group_max_tokens == 8 * BLOCK  # default: a group's capacity


def test_mixed_load_completes_chunks_stay_in_one_group_and_reserved_requests_are_never_preempted():
    rng = random.Random(0)
    sched = kvp_scheduler(num_groups=3, blocks_per_group=12, budget=40, max_seqs=16)
    requests = [add(sched, f"r{i}", rng.choice([10, 30, 50, 90, 140]), max_tokens=rng.choice([4, 20]))
                for i in range(30)]
    reserved: set[str] = set()
    steps = 0
    while sched.has_unfinished:
        plan = sched.schedule()
        for chunk in plan.chunks:
            assert chunk.start // L == (chunk.start + chunk.num_new_tokens - 1) // L
            if sched.pool.is_reserved(sched.requests[chunk.request_id]):
                reserved.add(chunk.request_id)
        land(sched, plan)
        steps += 1
        assert steps < 5000
    assert reserved  # the load had long requests
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert all(r.metrics.num_preemptions == 0 for r in requests if r.request_id in reserved)
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
