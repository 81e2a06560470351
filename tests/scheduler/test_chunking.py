"""Adaptive chunking against a synthetic step-time model, with a fake clock: chunks shrink as the
prefix grows, steps stay within the budget while decodes run, chunks stop at KVP boundaries,
several prefills share a step and long prefills yield to short ones."""

from __future__ import annotations

import itertools

import pytest

from mnemosyne.config import PIPELINE_MIN_CHUNK, EngineConfig
from mnemosyne.scheduler.chunking import GRANULARITY, AdaptiveChunking, FixedChunking, make_chunking
from mnemosyne.scheduler.factory import kvp_group_boundary
from mnemosyne.scheduler.latency_model import Layout
from mnemosyne.scheduler.policy import LARS, Deadlines, PolicyContext
from tests.scheduler.factories import add, land, make_scheduler, shapes, synthetic_model

BUDGET_S = 0.05


def adaptive(budget_s: float | None = BUDGET_S, max_tokens: int = 1 << 20, layout: Layout | None = None):
    model = synthetic_model(layout)
    return AdaptiveChunking(model, budget_s, max_tokens), model


def lars_scheduler(rho_max: float, group_boundary=None):
    """LARS (deadlines at a 2 s TTFT SLO) with adaptive chunks against the synthetic step-time model."""
    model = synthetic_model()
    deadlines = Deadlines(model.prefill_work_s, ttft_slo_s=2.0)
    chunking, _ = adaptive()
    sched, clock = make_scheduler(policy=LARS(PolicyContext(deadlines, rho_max=rho_max)), chunking=chunking,
                                  group_boundary=group_boundary)
    return sched, clock, model


def run_steps(sched, clock, model, num_steps: int):
    plans = []
    for _ in range(num_steps):
        plan = sched.schedule()
        if not plan.chunks:
            break
        clock.now_s += model.step_time_s(shapes(plan))
        land(sched, plan)
        plans.append(plan)
    return plans


def test_chunks_shrink_as_the_prefix_grows_and_fit_the_budget():
    chunking, model = adaptive()
    sched, clock = make_scheduler(chunking=chunking)
    add(sched, "long", 40_000, 0.0, max_tokens=1)
    plans = run_steps(sched, clock, model, 1000)
    sizes = [p.chunks[0].num_new_tokens for p in plans]
    assert sum(sizes) == 40_000
    assert all(s % GRANULARITY == 0 for s in sizes[:-1])  # only the remainder is off the grid
    assert all(a >= b for a, b in itertools.pairwise(sizes[:-1]))  # never grows
    assert sizes[0] > 8 * sizes[-2]  # large early, small late
    assert all(model.step_time_s(shapes(p)) <= BUDGET_S for p in plans)


def test_step_time_stays_within_budget_while_decodes_run():
    chunking, model = adaptive()
    sched, clock = make_scheduler(chunking=chunking)
    for i in range(16):
        add(sched, f"chat{i}", 200, 0.0, max_tokens=400)
    run_steps(sched, clock, model, 2)  # the chats are decoding now
    long = add(sched, "long", 30_000, clock.now_s, max_tokens=1)
    plans = run_steps(sched, clock, model, 300)
    with_decodes = [p for p in plans if any(c.num_new_tokens == 1 for c in p.chunks)]
    assert len(with_decodes) > 50
    assert all(model.step_time_s(shapes(p)) <= BUDGET_S for p in with_decodes)
    assert long.is_finished  # the prefill finished alongside the decodes


def test_fixed_chunking_ignores_time():
    model = synthetic_model()
    sched, clock = make_scheduler(chunking=FixedChunking(2048, model))
    add(sched, "long", 20_000, 0.0, max_tokens=1)
    plans = run_steps(sched, clock, model, 20)
    assert [p.chunks[0].num_new_tokens for p in plans[:9]] == [2048] * 9
    assert model.step_time_s(shapes(plans[8])) > BUDGET_S  # late chunks blow the budget


def test_chunks_are_clipped_at_kvp_group_boundaries():
    group = 1000
    chunking, model = adaptive(layout=Layout(kvp=4, kvp_group_max_tokens=group))
    sched, clock = make_scheduler(chunking=chunking, group_boundary=kvp_group_boundary(group))
    add(sched, "long", 3500, 0.0, max_tokens=1)
    plans = run_steps(sched, clock, model, 100)
    spans = [(c.start, c.start + c.num_new_tokens) for p in plans for c in p.chunks]
    assert spans[-1][1] == 3500
    assert all(start // group == (end - 1) // group for start, end in spans)
    assert {end for _, end in spans} >= {1000, 2000, 3000}


def test_a_custom_group_boundary_hook_is_honoured():
    sched, clock = make_scheduler(budget=64, group_boundary=lambda start: start + 10)
    add(sched, "a", 35, 0.0, max_tokens=1)
    plans = run_steps(sched, clock, synthetic_model(), 10)
    assert [p.chunks[0].num_new_tokens for p in plans] == [10, 10, 10, 5]


def test_several_prefills_share_a_step_and_long_work_yields_to_short():
    sched, clock, model = lars_scheduler(0.5)
    add(sched, "long", 200_000, 0.0, max_tokens=1)
    run_steps(sched, clock, model, 30)
    add(sched, "short", 300, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    by_id = {c.request_id: c.num_new_tokens for c in plan.chunks}
    assert set(by_id) == {"long", "short"}  # multi-prefill: the short one rides along at once
    assert by_id["short"] == 300
    assert model.step_time_s(shapes(plan)) <= BUDGET_S


def _chat_prompt_cut_in_two(group_boundary=None):
    """LARS: a 3,000-token prompt whose first chunk filled a step, then a 300-token prompt arriving.
    The first yields to the second (fewer tokens than its remainder)."""
    sched, clock, model = lars_scheduler(0.9, group_boundary)
    first = add(sched, "first", 3000, 0.0, max_tokens=4)
    run_steps(sched, clock, model, 1)
    assert 300 < first.num_uncomputed_tokens < 3000
    add(sched, "second", 300, clock.now_s, max_tokens=4)
    return sched, model, first


def test_budget_yielded_and_left_unused_goes_back_to_finish_a_prompt():
    """What the second prompt leaves of the budget it was yielded goes back to the first, whose
    remainder then fits: both prompts get their first tokens from this step (before, the first
    waited a whole step more, behind a step that held the short prompt alone)."""
    sched, model, first = _chat_prompt_cut_in_two()
    rest = first.num_uncomputed_tokens
    plan = sched.schedule()
    by_id = {c.request_id: (c.start, c.num_new_tokens) for c in plan.chunks}
    assert by_id == {"first": (3000 - rest, rest), "second": (0, 300)}
    assert model.step_time_s(shapes(plan)) <= BUDGET_S
    known = -(-(3000 - rest) // 16)  # the blocks of its first chunk, which the workers have
    grown = next(c for c in plan.chunks if c.request_id == "first")
    assert grown.new_block_ids == tuple(first.block_ids[known:]) and len(first.block_ids) == 3000 // 16 + 1
    land(sched, plan)
    assert first.num_computed_tokens == 3000 and first.num_output_tokens == 1


def test_a_yielded_budget_is_not_taken_back_to_cross_a_kvp_group_boundary():
    sched, _, first = _chat_prompt_cut_in_two(group_boundary=kvp_group_boundary(2600))
    assert first.num_computed_tokens < 2600 - 300  # it has more than the second's tokens left in its group
    plan = sched.schedule()
    spans = {c.request_id: (c.start, c.start + c.num_new_tokens) for c in plan.chunks}
    assert spans["second"] == (0, 300)
    assert "first" not in spans or spans["first"][1] <= 2600


def test_a_long_prompt_keeps_yielding_what_it_cannot_finish_with():
    """Budget left by short work goes back only to finish a prompt: a long prompt's chunk would fill the
    step the short prompt's first token waits for."""
    sched, clock, model = lars_scheduler(0.9)
    add(sched, "long", 200_000, 0.0, max_tokens=1)
    run_steps(sched, clock, model, 30)
    add(sched, "short", 300, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    assert {c.request_id: c.num_new_tokens for c in plan.chunks}["short"] == 300
    assert model.step_time_s(shapes(plan)) < 0.5 * BUDGET_S  # the 90% the long prompt yielded stays unused


class _Scripted:
    """A policy whose order and yield share the test sets, to reach one corner of the take-back."""

    def __init__(self, first: str):
        self.first = first
        self.share = 0.0

    def order(self, requests, now_s):
        return sorted(requests, key=lambda r: r.request_id != self.first)

    def yield_share(self, request, now_s, behind):
        return self.share if request.request_id == self.first else 0.0

    def rides_along(self, request, behind):
        return False


def test_a_yielder_preempted_later_in_the_step_does_not_take_its_yield_back():
    """A running prompt that yields all its budget stays unscheduled, so a running request after it in
    the order that arrived before it may preempt it for blocks. Its yield is then not taken back: that
    would reserve blocks for a request that is waiting again, whose whole prompt now fits the budget
    that shorter work left unused."""
    chunking, model = adaptive()
    policy = _Scripted(first="yielder")
    # blocks of 16 tokens: the two first chunks hold 88 and 90; the earlier prompt's remainder needs
    # 10 more, and 5 are free
    sched, clock = make_scheduler(policy=policy, chunking=chunking, num_blocks=183)
    earlier = add(sched, "earlier", 1600, 0.0, max_tokens=1)
    yielder = add(sched, "yielder", 2000, 0.0, max_tokens=1)
    policy.share = 0.5  # both admitted: the yielder takes half the budget, the earlier prompt the rest
    plan = sched.schedule()
    assert {c.request_id: c.num_new_tokens for c in plan.chunks} == {"yielder": 1408, "earlier": 1440}
    clock.now_s += model.step_time_s(shapes(plan))
    land(sched, plan)

    policy.share = 0.99  # the yielder leaves its 592 tokens to the earlier prompt's 160
    plan = sched.schedule()
    assert [(c.request_id, c.start, c.num_new_tokens) for c in plan.chunks] == [("earlier", 1440, 160)]
    assert yielder in sched.waiting and yielder.num_computed_tokens == 0 and not yielder.block_ids
    assert yielder.metrics.num_preemptions == 1
    assert model.step_time_s([(2000, 0), (160, 1440)]) < BUDGET_S  # its whole prompt would have fit
    land(sched, plan)
    assert earlier.num_output_tokens == 1

    policy.share = 0.0
    plan = sched.schedule()  # admitted again, from its first token
    assert [(c.request_id, c.start) for c in plan.chunks] == [("yielder", 0)]


def _late_long_prefill():
    """LARS, a 200K-token prompt 30 steps into its prefill and past its deadline."""
    sched, clock, model = lars_scheduler(0.9)
    long = add(sched, "long", 200_000, 0.0, max_tokens=1, deadline_s=0.5)
    run_steps(sched, clock, model, 30)
    assert sched.policy.deadlines.slack_s(long, clock.now_s) < 0
    return sched, clock, model


def test_a_late_long_prefill_still_lets_a_short_prompt_ride_along():
    """Past its deadline the long prompt has no slack to yield from, but a short prompt's work is under
    1% of its own, so the short one still rides along at once, not at its own deadline."""
    sched, clock, model = _late_long_prefill()
    add(sched, "short", 300, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    assert {c.request_id: c.num_new_tokens for c in plan.chunks}.get("short") == 300
    assert model.step_time_s(shapes(plan)) <= BUDGET_S


def test_a_long_prompts_last_tokens_let_a_short_prompt_ride_along():
    """600 tokens left of a 50K-token prompt are fewer than a 1,000-token prompt's, but far more work, each
    attending over the whole prefix: the short prompt's work is under 1% of the long one's, so it rides
    along whole at once (by tokens alone the long prompt yielded nothing: call62, 0.25 s TTFTs)."""
    sched, clock, model = lars_scheduler(0.9)
    long = add(sched, "long", 50_000, 0.0, max_tokens=1)
    while long.num_uncomputed_tokens > 600:
        run_steps(sched, clock, model, 1)
    assert long.num_uncomputed_tokens < 1000
    assert model.prefill_work_s(50_000 - long.num_uncomputed_tokens, 50_000) > 4 * model.prefill_work_s(0, 1000)
    add(sched, "short", 1000, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    assert {c.request_id: c.num_new_tokens for c in plan.chunks}["short"] == 1000
    assert model.step_time_s(shapes(plan)) <= BUDGET_S


def test_work_all_in_flight_is_not_waited_for():
    """A request with every token in flight has nothing for this step: the long prefill yields it
    nothing, and takes the chunk it takes alone."""
    alone = _late_long_prefill()[0].schedule()
    sched, clock, _ = _late_long_prefill()
    busy = add(sched, "busy", 300, clock.now_s, max_tokens=1)
    busy.num_inflight_tokens = 300
    assert shapes(sched.schedule()) == shapes(alone)


def test_without_yielding_the_short_prefill_waits():
    chunking, model = adaptive()
    sched, clock = make_scheduler(chunking=chunking)  # FCFS: yields nothing
    add(sched, "long", 200_000, 0.0, max_tokens=1)
    run_steps(sched, clock, model, 30)
    add(sched, "short", 300, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    assert [c.request_id for c in plan.chunks] == ["long"]


def test_an_infeasible_budget_slows_prefills_instead_of_starving_them():
    chunking, model = adaptive(budget_s=0.002)  # decodes alone take longer than this
    sched, clock = make_scheduler(chunking=chunking)
    for i in range(200):
        add(sched, f"chat{i}", 40, 0.0, max_tokens=50)
    run_steps(sched, clock, model, 200)
    add(sched, "late", 100, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    assert ("late", GRANULARITY) in [(c.request_id, c.num_new_tokens) for c in plan.chunks]


def test_no_time_budget_means_the_token_cap_alone():
    chunking, model = adaptive(budget_s=None, max_tokens=512)
    sched, clock = make_scheduler(chunking=chunking)
    add(sched, "long", 2000, 0.0, max_tokens=1)
    assert [p.chunks[0].num_new_tokens for p in run_steps(sched, clock, model, 10)] == [512, 512, 512, 464]


@pytest.mark.parametrize("spec", ["fixed", "fixed:0", "fixed:x", "adaptive:3", "dynamic"])
def test_bad_chunking_specs_name_the_flag(spec):
    with pytest.raises(ValueError, match="--chunking"):
        make_chunking(spec, synthetic_model(), None, 2048)


def test_without_a_budget_spp_chunks_are_cut_to_the_pipelines_best_stage_time():
    """No TBT budget, 4 stages under SPP: each chunk of a prompt with W of stage work takes at most
    t = h + sqrt(W h / 3) per stage, the largest power of two that does (few lengths, so that cuDNN's
    plans are built at start-up), so chunks shrink as the prefix grows, and a longer prompt gets longer
    chunks; without SPP (one stage), the token cap alone."""
    model = synthetic_model(Layout(pp=4))
    spp = make_chunking("adaptive", model, None, 16384, spp_stages=4)
    plain = AdaptiveChunking(model, None, 16384)
    assert plain.new_step().fit(200_000, 50_000, 0.0) == 16384
    # `pipeline` names the same policy
    assert make_chunking("pipeline", model, None, 16384, spp_stages=4).new_step().fit(50_000, 500_000, 0.0) == \
        spp.new_step().fit(50_000, 500_000, 0.0) < 16384
    budget = spp.new_step()
    prefixes = (0, 100_000, 200_000, 290_000)
    sizes = [budget.fit(prefix, 300_000 - prefix, 0.0) for prefix in prefixes]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert all(s & (s - 1) == 0 and s >= PIPELINE_MIN_CHUNK for s in sizes)
    target_s = 4 * budget.stage_target_s(300_000)
    for prefix, size in zip(prefixes[1:], sizes[1:], strict=True):  # within the stage time, the next length over
        assert size == PIPELINE_MIN_CHUNK or model.step_time_s([(size, prefix)]) <= target_s  # (or the shortest)
        assert target_s < model.step_time_s([(2 * size, prefix)])
    assert budget.fit(290_000, 700, 0.0) == 700  # a remainder under the shortest length goes whole
    rest = budget.fit(0, 5000, 0.0)
    assert rest & (rest - 1) == 0 and PIPELINE_MIN_CHUNK <= rest < 5000  # a longer one is cut to a power of two too
    # the same prefix in a longer prompt: more work, a longer target, a larger chunk
    assert budget.fit(20_000, 100_000, 0.0) < budget.fit(20_000, 1_000_000, 0.0)


@pytest.mark.parametrize(("pp", "tbt_slo_ms", "cap"), [(4, None, 16384), (4, None, 20000), (2, None, 1024),
                                                     (4, 50.0, 16384), (1, None, 16384)])
def test_the_workers_start_up_plans_cover_every_chunk_the_policy_cuts(pp, tbt_slo_ms, cap):
    """`EngineConfig.long_prompt_chunks` (the chunk lengths whose cuDNN plans the worker builds at
    start-up) holds every chunk, at least PIPELINE_MIN_CHUNK long, that the engine's adaptive chunking
    gives a lone long prompt without a TBT budget, taper or token cap."""
    config = EngineConfig(model="dummy:tiny", pipeline_parallel_size=pp, max_num_batched_tokens=cap,
                          tbt_slo_ms=tbt_slo_ms)
    model = synthetic_model(Layout(pp=pp))
    chunking = make_chunking(config.chunking, model, tbt_slo_ms and tbt_slo_ms / 1e3, cap, config.spp_stages)
    for prompt in (3000, 70_000, 400_000):
        done, sizes = 0, []
        while done < prompt:
            size = chunking.new_step().fit(done, prompt - done, 0.0)
            sizes.append(size)
            done += size
        if tbt_slo_ms is None:  # (at the cap, the last chunk is the prompt's remainder: any length)
            checked = sizes if config.spp_stages > 1 else sizes[:-1]
            assert {s for s in checked if s >= PIPELINE_MIN_CHUNK} <= set(config.long_prompt_chunks), sizes
    assert (len(config.long_prompt_chunks) > 1) == (pp > 1 and tbt_slo_ms is None and cap > PIPELINE_MIN_CHUNK)


def test_long_prompts_among_short_ones_stay_one_run_of_blocks_each():
    """LARS with adaptive chunks: short prompts, some long enough to take several chunks, arrive, ride
    along and leave while two long ones are prefilled. Each long prompt's blocks stay consecutive, so
    each of its chunks attends to its earlier KV as one run (one cuDNN call a layer), not as a run per
    earlier chunk."""
    sched, clock, model = lars_scheduler(0.5)
    longs = [add(sched, "long0", 60_000, 0.0, max_tokens=1), add(sched, "long1", 40_000, 0.0, max_tokens=1)]
    shorts, blocks, chunks_of = [], {}, {}
    for step in itertools.count():
        if step % 2 == 0:
            shorts.append(add(sched, f"short{step}", 200 + 461 * (step % 5), clock.now_s, max_tokens=2))
        plan = run_steps(sched, clock, model, 1)[0]
        for c in plan.chunks:
            chunks_of[c.request_id] = chunks_of.get(c.request_id, 0) + 1
        if all(r.num_computed_tokens == r.num_prompt_tokens for r in longs):
            break
        blocks.update({r.request_id: list(r.block_ids) for r in longs if r.block_ids})
    assert min(chunks_of["long0"], chunks_of["long1"]) > 10 and sum(r.is_finished for r in shorts) > 10
    assert sum(chunks_of.get(r.request_id, 0) > 1 for r in shorts) > 5  # shorts of several chunks too
    for ids in blocks.values():
        assert ids == list(range(ids[0], ids[0] + len(ids)))


def _first_step_beside_decodes(live_yield: float, prompt_len: int, num_decodes: int = 8):
    """The step planned once a prompt of prompt_len tokens arrives among num_decodes decoding chats (FCFS:
    nothing yields on its own), with its predicted time and the time of its decodes alone."""
    model = synthetic_model()
    sched, clock = make_scheduler(chunking=AdaptiveChunking(model, BUDGET_S, 1 << 20, live_yield=live_yield))
    for i in range(num_decodes):
        add(sched, f"chat{i}", 200, 0.0, max_tokens=400)
    run_steps(sched, clock, model, 2)  # the chats are decoding now
    add(sched, "prompt", prompt_len, clock.now_s, max_tokens=1)
    plan = sched.schedule()
    chunk = next(c for c in plan.chunks if c.request_id == "prompt")
    est = model.estimate()
    for c in plan.chunks:
        if c.num_new_tokens == 1:
            est.add(1, c.start)
    return chunk.num_new_tokens, model.step_time_s(shapes(plan)), est.time_s


def test_a_long_prompt_beside_other_work_leaves_its_live_yield_of_the_budget():
    """--live-yield 0.4: beside decodes, a long prompt's chunk takes at most 60% of what the decodes leave of
    the budget (the step ends sooner for whoever arrives meanwhile); without it, the step fills the budget."""
    full, full_s, decodes_s = _first_step_beside_decodes(0.0, 200_000)
    part, part_s, _ = _first_step_beside_decodes(0.4, 200_000)
    assert BUDGET_S - 0.002 < full_s <= BUDGET_S
    assert decodes_s + 0.6 * (BUDGET_S - decodes_s) - 0.002 < part_s <= decodes_s + 0.6 * (BUDGET_S - decodes_s)
    assert part < full


def test_live_yield_spares_short_prompts_and_a_long_prompt_alone():
    # a 2,000-token prompt is about one budget of work: its chunk is the same either way
    assert _first_step_beside_decodes(0.4, 2000)[0] == _first_step_beside_decodes(0.0, 2000)[0] == 2000
    # alone in its step, a long prompt fills the budget whatever --live-yield says
    assert _first_step_beside_decodes(0.4, 200_000, num_decodes=0)[:2] == \
        _first_step_beside_decodes(0.0, 200_000, num_decodes=0)[:2]


def test_live_yield_reaches_the_chunking_from_the_config():
    from mnemosyne.models.loaders.dummy import PRESETS
    from mnemosyne.scheduler.factory import build_scheduler

    config = EngineConfig(model="dummy:tiny", tbt_slo_ms=50, live_yield=0.25)
    assert build_scheduler(config, PRESETS["tiny"], 1024, 4096, synthetic_model()).chunking.new_step().live_yield == 0.25
    with pytest.raises(ValueError, match="--live-yield"):
        EngineConfig(model="dummy:tiny", live_yield=1.0)
