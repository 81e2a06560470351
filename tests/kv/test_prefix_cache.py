"""Prefix caching in the scheduler: cached tokens count as computed, the first chunk starts after
them, KVP placements are reused in place, and eviction or preemption never hands a request a block
whose KV is not its own. No model: a shadow of the KV cache records what each slot holds."""

from __future__ import annotations

import random

from mnemosyne.kv.block_hash import extend_block_hashes
from mnemosyne.kv.kvp_placement import KvpPlacement
from mnemosyne.plan import StepPlan
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.factory import kvp_group_boundary
from mnemosyne.scheduler.policy import FCFS, Deadlines
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits
from tests.scheduler.factories import FakeClock, land, synthetic_model

BLOCK = 16
DOC = list(range(1, 301))


def make(num_groups: int = 1, blocks_per_group: int = 64, group_max_tokens: int | None = None,
         budget: int = 1 << 20, caching: bool = True, max_seqs: int = 64) -> Scheduler:
    placement = KvpPlacement(num_groups, blocks_per_group, BLOCK, group_max_tokens, enable_prefix_caching=caching)
    boundary = kvp_group_boundary(placement.group_max_tokens) if num_groups > 1 else None
    return Scheduler(SchedulerLimits(budget, max_seqs, 1 << 20), placement, FCFS(), FakeClock(),
                     group_boundary=boundary)


def add(sched: Scheduler, rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_s=0.0)
    sched.add_request(req, seed=0)
    return req


class ShadowKv:
    """What every cache slot holds, as the workers would write it: the token ids of the whole prefix
    up to and including the slot's position (the KV at a position depends on all of them). Each
    scheduled chunk must read exactly its own prefix in every slot before it."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, tuple[int, ...]] = {}
        self.num_reads = 0

    def run(self, plan: StepPlan) -> None:
        for chunk in plan.chunks:
            request = self.sched.requests[chunk.request_id]
            tokens = tuple(request.token_ids)
            for position in range(chunk.start + chunk.num_new_tokens):
                slot = request.block_ids[position // BLOCK] * BLOCK + position % BLOCK
                if position < chunk.start:
                    assert self.slots.get(slot) == tokens[: position + 1], (chunk.request_id, position)
                    self.num_reads += 1
                else:
                    self.slots[slot] = tokens[: position + 1]


def check_pools(sched: Scheduler) -> None:
    """Reference counts are the number of running requests holding a block, no free block is held,
    and a block indexed in the cache holds the prefix of every request that holds it."""
    placement = sched.pool
    holders: dict[int, list[tuple[Request, int]]] = {}
    for request in sched.running:
        for i, block in enumerate(request.block_ids):
            holders.setdefault(block, []).append((request, i))
    for group, pool in enumerate(placement.pools):
        for local in range(pool.num_blocks):
            block = group * placement.blocks_per_group + local
            held = holders.get(block, [])
            assert pool._num_refs[local] == len(held), block  # the pool's own count, read for the check
            assert not held or (local not in pool._free and not pool.is_evictable(local))
            block_hash = pool._hash_of.get(local)
            assert len(held) <= 1 or block_hash is not None  # only the cache shares blocks
            for request, i in held if block_hash is not None else ():
                extend_block_hashes(request.block_hashes, request.token_ids, BLOCK, i + 1)
                assert request.block_hashes[i] == block_hash


def run(sched: Scheduler, shadow: ShadowKv | None = None, max_steps: int = 5000) -> list[StepPlan]:
    plans = []
    while sched.has_unfinished:
        plans.append(sched.schedule())
        if shadow is not None:
            shadow.run(plans[-1])
        check_pools(sched)
        land(sched, plans[-1])
        assert len(plans) < max_steps
    return plans


def test_a_cached_prefix_counts_as_computed_and_the_first_chunk_starts_after_it():
    sched = make()
    first = add(sched, "first", DOC[:100])
    plans = run(sched)
    first_blocks = plans[0].chunks[0].new_block_ids
    assert first.num_cached_tokens == 0
    second = add(sched, "second", [*DOC[:100], 500, 501])
    assert second.num_cached_tokens == 96  # expected when queued: six full blocks
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert (chunk.start, chunk.num_new_tokens) == (96, 6)
    assert second.num_computed_tokens == 96 and second.num_cached_tokens == 96
    assert chunk.new_block_ids[:6] == first_blocks[:6]
    # first's seventh block was partial, so never cached: it came back empty, and second grows in place
    # into it (one run of blocks) with the KV of its own tokens 96..101
    assert chunk.new_block_ids[6] == first_blocks[6] == first_blocks[5] + 1
    assert list(plan.new_requests[0].token_ids) == [*DOC[:100], 500, 501]  # the workers get the whole prompt
    assert (sched.pool.num_hit_tokens, sched.pool.num_queried_tokens) == (96, 100 + 102)


def test_the_last_prompt_token_is_always_computed_for_its_logits():
    sched = make()
    add(sched, "a", DOC[:64])
    add(sched, "b", DOC[:65])
    run(sched)
    again_64, again_65 = add(sched, "a2", DOC[:64]), add(sched, "b2", DOC[:65])
    plan = sched.schedule()
    assert [(c.start, c.num_new_tokens) for c in plan.chunks] == [(48, 16), (64, 1)]
    assert (again_64.num_cached_tokens, again_65.num_cached_tokens) == (48, 64)


def test_requests_running_at_once_share_blocks_and_give_them_all_back():
    sched = make(budget=80)
    shadow = ShadowKv(sched)
    a = add(sched, "a", DOC[:64] + [900] * 20, max_tokens=30)
    plan = sched.schedule()
    shadow.run(plan)
    land(sched, plan)  # a's prompt is computed; a keeps decoding
    b = add(sched, "b", DOC[:64] + [901] * 5, max_tokens=30)
    plan = sched.schedule()
    starts = {c.request_id: c.start for c in plan.chunks}
    assert starts["b"] == 64 and b.block_ids[:4] == a.block_ids[:4]
    shadow.run(plan)
    land(sched, plan)
    run(sched, shadow)
    assert shadow.num_reads > 0
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_with_caching_off_every_prompt_is_computed_from_the_start():
    sched = make(caching=False)
    add(sched, "a", DOC[:100])
    run(sched)
    b = add(sched, "b", DOC[:100])
    assert sched.schedule().chunks[0].start == 0 and b.num_cached_tokens == 0
    assert sched.pool.num_hit_tokens == sched.pool.num_queried_tokens == 0


def test_a_prefix_spanning_kvp_groups_is_reused_in_place_and_onboarding_continues_from_it():
    L = 64
    sched = make(num_groups=3, blocks_per_group=16, group_max_tokens=L)
    shadow = ShadowKv(sched)
    pad = add(sched, "pad", [7] * 40, max_tokens=4)  # loads group 0: the long request starts elsewhere
    shadow.run(plan := sched.schedule())
    land(sched, plan)
    add(sched, "a", DOC[:150])
    shadow.run(plan := sched.schedule())
    groups_a = sched.pool.group_ids("a")
    assert groups_a[0] != 0 and len(groups_a) == 3
    land(sched, plan)
    plans = [plan, *run(sched, shadow)]
    a_blocks = [b for p in plans for c in p.chunks if c.request_id == "a" for b in c.new_block_ids]
    assert pad.is_finished

    # 130 tokens in common: two full shards (128 tokens) on a's first two groups, in that order
    add(sched, "b", DOC[:130] + [999] * 10)
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert sched.pool.group_ids("b")[:2] == groups_a[:2]
    assert chunk.new_block_ids[:8] == tuple(a_blocks[:8])
    assert chunk.start == 128 and len(sched.pool.active_group_ids("b", chunk.start + 1)) == 3  # processed // L + 1
    shadow.run(plan)
    land(sched, plan)
    run(sched, shadow)

    # 100 tokens in common: shard 0 and two blocks of shard 1; shard 1 goes on in a's second group
    c = add(sched, "c", DOC[:100] + [555] * 5)
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert chunk.start == 96 and sched.pool.group_ids("c") == groups_a[:2]
    assert c.block_ids[6] // sched.pool.blocks_per_group == groups_a[1]
    assert chunk.start + chunk.num_new_tokens <= 2 * L
    shadow.run(plan)
    land(sched, plan)
    run(sched, shadow)
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_a_short_request_whose_prefix_group_is_full_runs_elsewhere_without_it():
    sched = make(num_groups=2, blocks_per_group=8, group_max_tokens=128)
    shadow = ShadowKv(sched)
    add(sched, "a", DOC[:40], max_tokens=1)
    run(sched, shadow)
    assert [pool.num_cached_blocks for pool in sched.pool.pools] == [2, 0]
    add(sched, "hog", [3] * 90, max_tokens=6)  # 96 tokens: the 6 uncached blocks of group 0
    shadow.run(plan := sched.schedule())
    land(sched, plan)
    assert sched.pool.group_ids("hog") == (0,)
    b = add(sched, "b", [*DOC[:40], 4])
    assert b.num_cached_tokens == 32  # expected, but group 0 has no room for the rest of it ...
    plan = sched.schedule()
    chunk = next(c for c in plan.chunks if c.request_id == "b")
    assert chunk.start == 0 and sched.pool.group_ids("b") == (1,)  # ... so it starts from scratch on group 1
    assert b.num_cached_tokens == 0
    shadow.run(plan)
    land(sched, plan)
    run(sched, shadow)
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_eviction_under_cache_pressure_never_corrupts_a_running_request():
    rng = random.Random(0)
    sched = make(blocks_per_group=14, budget=40, max_seqs=8)  # 224 tokens for requests of up to 190
    shadow = ShadowKv(sched)
    requests, plans = [], []
    for _step in range(2000):
        if len(requests) < 40:
            common = rng.choice([0, 17, 48, 64, 100, 130])
            tokens = DOC[:common] + [rng.randrange(400, 500) for _ in range(rng.choice([1, 5, 20]))]
            requests.append(add(sched, f"r{len(requests)}", tokens, max_tokens=rng.choice([2, 12, 40])))
        if not sched.has_unfinished:
            if len(requests) == 40:
                break
            continue
        plans.append(plan := sched.schedule())
        shadow.run(plan)
        check_pools(sched)
        land(sched, plan)
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert sched.pool.num_evicted_blocks > 0 and sched.num_preemptions > 0  # the cache was under pressure
    assert sched.pool.num_hit_tokens > 0 and shadow.num_reads > 0
    seen, readmission_starts = set(), []
    for plan in plans:
        starts = {c.request_id: c.start for c in plan.chunks}
        for new in plan.new_requests:
            if new.request_id in seen:
                readmission_starts.append(starts[new.request_id])
            seen.add(new.request_id)
    assert any(start > 0 for start in readmission_starts)  # a preempted request reused its own blocks
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_deadlines_and_work_count_only_the_uncached_remainder():
    work_s = synthetic_model().prefill_work_s
    deadlines = Deadlines(work_s)
    sched = make()
    add(sched, "a", DOC[:200])
    run(sched)
    b = add(sched, "b", DOC[:200] + [3] * 10)
    fresh = add(sched, "fresh", [3] * 210)
    assert b.num_cached_tokens == 192
    assert deadlines.total_work_s(b) == work_s(192, 210) < deadlines.total_work_s(fresh) == work_s(0, 210)
    assert deadlines.remaining_work_s(b) == work_s(192, 210)  # still waiting: the cache is as good as done


def test_a_lookup_hashes_the_prompt_only_as_far_as_its_hit_goes():
    """A new request's lookup stops at its first uncached block: a long prompt with nothing cached
    costs one batch of hashes at admission, not its whole length (which held the engine core 0.31 s
    at 1M tokens); the rest are hashed as its chunks land. A hit longer than a batch is still found."""
    from mnemosyne.kv.kvp_placement import HASH_BATCH

    sched = make(blocks_per_group=1024)
    doc = list(range(1, 1 + BLOCK * (2 * HASH_BATCH + 10)))  # a prefix of 2 batches and more
    first = add(sched, "first", [*doc, 7])
    assert len(first.block_hashes) == HASH_BATCH  # nothing cached: one batch
    while "first" in sched.requests:
        land(sched, sched.schedule())
    second = add(sched, "second", [*doc, 8, 9])
    assert second.num_cached_tokens == len(doc)  # the whole cached prefix, across batches
    want: list[bytes] = []
    extend_block_hashes(want, second.token_ids, BLOCK, len(second.block_hashes))
    assert second.block_hashes == want  # the same chain as hashed in one go
