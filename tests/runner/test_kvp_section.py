"""Each KVP group's section of real scheduler plans: which groups compute a chunk (the onboarding
sequence), which one writes its KV, which one samples, and the gather shared by all groups."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import pytest

from mnemosyne.plan import StepPlan
from mnemosyne.runner.kvp_section import KvShards, plan_section
from tests.kv.test_kvp_placement import BLOCK, L, add, kvp_scheduler
from tests.scheduler.factories import land


@dataclass
class State:
    token_ids: array = field(default_factory=lambda: array("i"))
    kv: KvShards = field(default_factory=KvShards)


class Workers:
    """Replicated request state as every rank keeps it, fed with the plans' diffs."""

    def __init__(self, blocks_per_group: int):
        self.blocks_per_group = blocks_per_group
        self.requests: dict[str, State] = {}

    def apply(self, plan: StepPlan) -> None:
        for rid in plan.freed_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = State(array("i", new.token_ids))
        for chunk in plan.chunks:
            state = self.requests[chunk.request_id]
            state.token_ids.extend(chunk.new_token_ids)
            state.kv.add_blocks(chunk.new_block_ids, self.blocks_per_group, BLOCK, group=-1)


def test_the_onboarding_sequence_of_one_long_prompt_on_the_workers():
    sched = kvp_scheduler(num_groups=4)
    add(sched, "long", 200, max_tokens=4)
    workers = Workers(sched.pool.blocks_per_group)
    seen = []
    while sched.has_unfinished:
        plan = sched.schedule()
        workers.apply(plan)
        sections = [plan_section(plan.chunks, workers.requests, g) for g in range(4)]
        (chunk,) = plan.chunks
        computing = [g for g, (rows, _) in enumerate(sections) if rows]
        writers = [g for g, (rows, _) in enumerate(sections) if rows and rows[0].is_writer]
        samplers = [g for g, (rows, _) in enumerate(sections) if rows and rows[0].is_sampled]
        groups = sched.pool.group_ids("long")
        assert len(writers) == 1 and writers[0] == groups[len(computing) - 1]  # the last active group writes
        assert sorted(computing) == sorted(groups[:len(computing)])
        num_gathered = {n for _, n in sections}
        assert num_gathered == {chunk.num_new_tokens if len(computing) > 1 else 0}  # same shape everywhere
        end = chunk.start + chunk.num_new_tokens
        if end == sched.requests["long"].num_tokens:
            assert samplers == [groups[0]]  # exactly one group samples: the request's first
        seen.append((chunk.start, end, len(computing)))
        land(sched, plan)
    assert seen == [(0, 48, 1), (48, 64, 1), (64, 112, 2), (112, 128, 2), (128, 176, 3), (176, 192, 3),
                    (192, 200, 4), (200, 201, 4), (201, 202, 4), (202, 203, 4)]


def test_sections_of_a_mixed_batch_line_up_across_groups():
    sched = kvp_scheduler(num_groups=3, budget=256)
    for rid, n in (("a", 150), ("b", 100), ("s1", 10), ("s2", 20), ("s3", 5)):
        add(sched, rid, n, max_tokens=6)
    workers = Workers(sched.pool.blocks_per_group)
    max_multi = 0
    while sched.has_unfinished:
        plan = sched.schedule()
        workers.apply(plan)
        sections = [plan_section(plan.chunks, workers.requests, g) for g in range(3)]
        assert len({n for _, n in sections}) == 1
        gathered = [r for rows, _ in sections for r in rows if r.gather_start >= 0]
        # each multi-group chunk has one writer and its rows land in the same gather slots everywhere
        by_chunk: dict[str, set[int]] = {}
        for r in gathered:
            by_chunk.setdefault(r.chunk.request_id, set()).add(r.gather_start)
        assert all(len(starts) == 1 for starts in by_chunk.values())
        max_multi = max(max_multi, len(by_chunk))
        for chunk in plan.chunks:
            rows = [r for rows, _ in sections for r in rows if r.chunk is chunk]
            assert sum(r.is_writer for r in rows) == 1
            assert sum(r.is_sampled for r in rows) == (chunk.start + chunk.num_new_tokens
                                                      == sched.requests[chunk.request_id].num_tokens)
        for rows, _ in sections:  # decodes first, as the backends expect
            sizes = [r.chunk.num_new_tokens != 1 for r in rows]
            assert sizes == sorted(sizes)
        land(sched, plan)
    assert max_multi == 2  # both long requests ran in the same steps


def test_a_chunk_across_a_group_boundary_is_refused():
    sched = kvp_scheduler(num_groups=2, budget=128, group_max_tokens=L)
    sched.group_boundary = None  # a broken scheduler: chunks are no longer clipped at L
    add(sched, "long", 100, max_tokens=4)
    workers = Workers(sched.pool.blocks_per_group)
    plan = sched.schedule()
    workers.apply(plan)
    with pytest.raises(RuntimeError, match="crosses a KVP group boundary"):
        plan_section(plan.chunks, workers.requests, 0)
