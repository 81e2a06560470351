"""The SPP rule, with no processes: the real Scheduler and engine Pipeline drive a simulated
pipeline of `pp` stages on a fake clock, which reports stage 0 done and the final result of each
micro-batch at the times a real pipeline would.

- sequence pipelining on: chunk i+1 of a prompt enters stage 0 as soon as chunk i has left it,
  while chunk i is still in later stages;
- off (ordinary pipeline parallelism): chunk i+1 waits for chunk i's result;
- either way a decode token waits for its predecessor's sample, and stage 0 takes one micro-batch
  at a time.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from mnemosyne.engine.pipeline import Pipeline
from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.plan import StageDone, StepEvent, StepPlan, StepResult
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.policy import FCFS
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits

STAGE_S = 1.0
"""Every stage takes this long per micro-batch, whatever is in it."""


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class SimulatedPipeline:
    """`num_stages` stages, each running micro-batches in submission order, STAGE_S each. Events
    come out in time order; waiting for them moves the fake clock."""

    def __init__(self, num_stages: int, clock: FakeClock, stage_s=lambda plan, stage: STAGE_S):
        self.num_stages = num_stages
        self.clock = clock
        self.stage_s = stage_s
        """A micro-batch's time on a stage."""
        self.stage_free_s = [0.0] * num_stages
        self.num_tokens: dict[str, int] = {}
        """Token ids known per request, as a worker keeps them: the last one is sampled from."""
        self.submitted: list[tuple[float, StepPlan]] = []
        self.results_s: dict[int, float] = {}
        self.stage0_done_s: dict[int, float] = {}
        self._events: list[tuple[float, int, StepEvent]] = []
        self._order = itertools.count()

    def submit(self, plan: StepPlan) -> None:
        self.submitted.append((self.clock.now_s, plan))
        for freed in plan.freed_ids:
            self.num_tokens.pop(freed, None)
        for new in plan.new_requests:
            self.num_tokens[new.request_id] = len(new.token_ids)
        sampled = []
        for chunk in plan.chunks:
            self.num_tokens[chunk.request_id] += len(chunk.new_token_ids)
            if chunk.start + chunk.num_new_tokens == self.num_tokens[chunk.request_id]:
                sampled.append(chunk.request_id)
        ready_s = self.clock.now_s
        for stage in range(self.num_stages):
            start_s = max(ready_s, self.stage_free_s[stage])
            ready_s = self.stage_free_s[stage] = start_s + self.stage_s(plan, stage)
            self._push(ready_s, StageDone(plan.step_id, 0, stage, start_s, ready_s))
        self._push(ready_s, StepResult(plan.step_id, tuple(sampled), (7,) * len(sampled), (None,) * len(sampled)))

    def wait_events(self, timeout_s: float | None = None) -> list[StepEvent]:
        at_s = self._events[0][0]
        self.clock.now_s = max(self.clock.now_s, at_s)
        events = []
        while self._events and self._events[0][0] == at_s:
            event = heapq.heappop(self._events)[2]
            if isinstance(event, StepResult):
                self.results_s[event.step_id] = at_s
            elif event.pp_rank == 0:
                self.stage0_done_s[event.step_id] = at_s
            events.append(event)
        return events

    def _push(self, at_s: float, event: StepEvent) -> None:
        heapq.heappush(self._events, (at_s, next(self._order), event))


def run(prompts: dict[str, int], num_stages: int, is_sequence_pipelined: bool, max_tokens: int = 4,
        budget: int = 16, num_blocks: int = 256, depth: int | None = None,
        stage_s=lambda plan, stage: STAGE_S) -> tuple[SimulatedPipeline, dict[str, Request]]:
    """Generate to completion as LLMEngine.step does; returns the pipeline's log and the requests."""
    clock = FakeClock()
    scheduler = Scheduler(SchedulerLimits(budget, 8, 4096), BlockPool(num_blocks, 4), FCFS(), clock)
    requests = {}
    for rid, prompt_len in prompts.items():
        requests[rid] = Request(rid, list(range(1, prompt_len + 1)),
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_s=0.0)
        scheduler.add_request(requests[rid], seed=0)
    executor = SimulatedPipeline(num_stages, clock, stage_s)
    pipeline = Pipeline(executor, scheduler, is_sequence_pipelined, depth=depth)
    for _ in range(10_000):
        if not scheduler.has_unfinished:
            return executor, requests
        assert pipeline.num_inflight <= pipeline.depth
        plan = scheduler.schedule() if pipeline.has_room else None
        for done_plan, result in pipeline.advance(plan):
            scheduler.update(done_plan, result)
    raise AssertionError("the pipeline did not finish")


def chunk_log(executor: SimulatedPipeline, rid: str) -> list[tuple[int, float, int]]:
    """(start token, dispatch time, step id) of each of the request's chunks, in order."""
    return [(c.start, at_s, plan.step_id) for at_s, plan in executor.submitted
            for c in plan.chunks if c.request_id == rid]


@pytest.mark.parametrize("num_stages", [2, 4])
def test_next_chunk_enters_while_the_previous_one_is_in_later_stages(num_stages):
    executor, requests = run({"long": 64}, num_stages, is_sequence_pipelined=True)
    log = chunk_log(executor, "long")
    prefill = [entry for entry in log if entry[0] < 64]
    assert [start for start, _, _ in prefill] == [0, 16, 32, 48]
    for (_, _, prev_step), (_, dispatch_s, _) in itertools.pairwise(prefill):
        assert dispatch_s == executor.stage0_done_s[prev_step]  # at once when stage 0 is free...
        assert dispatch_s < executor.results_s[prev_step]  # ...while the previous chunk is still in flight
    # All stages work on consecutive chunks at once: the prompt takes (chunks + stages - 1) stage times.
    assert requests["long"].metrics.first_token_s == (4 + num_stages - 1) * STAGE_S
    assert requests["long"].num_output_tokens == 4


def test_stage0_runs_ahead_of_a_longer_chunk_in_later_stages():
    """A long prompt's first chunk takes 4 stage times, the rest 1 (as chunks halve), and stage 0's GPU
    is the slowest (the later stages take half its time). With one micro-batch in flight per stage,
    stage 0 waits for that first chunk to leave the last stage before it takes a fifth, and the idle
    is lost: the prompt is paced by stage 0. With two per stage (--pipeline-depth 8) it goes on at once,
    and the faster stages catch up."""
    def slow_first(plan, stage):
        return (4 * STAGE_S if plan.step_id == 1 else STAGE_S) * (1.0 if stage == 0 else 0.5)

    runs = {depth: run({"long": 256}, 4, True, max_tokens=1, depth=depth, stage_s=slow_first)
            for depth in (None, 8)}
    (shallow, shallow_requests), (deep, deep_requests) = runs[None], runs[8]
    # stage 0 frees at 4 s, then every second; with depth 4 the fifth chunk (step 5) waits for step 1's
    # result: 4 s on stage 0 and 3 × 2 s on the others
    assert [at_s for _, at_s, _ in chunk_log(shallow, "long")[:6]] == pytest.approx([0, 4, 5, 6, 10, 11])
    assert [at_s for _, at_s, _ in chunk_log(deep, "long")[:6]] == pytest.approx([0, 4, 5, 6, 7, 8])
    # 16 chunks: stage 0 busy 4 + 15 s, then the last chunk's trip through three stages of 0.5 s; with
    # depth 4, stage 0's 3 s of waiting on top
    assert deep_requests["long"].metrics.first_token_s == pytest.approx(19 + 3 * 0.5)
    assert shallow_requests["long"].metrics.first_token_s == pytest.approx(19 + 3 * 0.5 + 3)


@pytest.mark.parametrize("num_stages", [2, 4])
def test_without_sequence_pipelining_the_next_chunk_waits_for_the_last_stage(num_stages):
    executor, requests = run({"long": 64}, num_stages, is_sequence_pipelined=False)
    prefill = [entry for entry in chunk_log(executor, "long") if entry[0] < 64]
    assert [start for start, _, _ in prefill] == [0, 16, 32, 48]
    for (_, _, prev_step), (_, dispatch_s, _) in itertools.pairwise(prefill):
        assert dispatch_s >= executor.results_s[prev_step]
    assert requests["long"].metrics.first_token_s == 4 * num_stages * STAGE_S


@pytest.mark.parametrize("is_sequence_pipelined", [True, False])
def test_a_decode_token_waits_for_the_previous_sample(is_sequence_pipelined):
    executor, requests = run({"a": 8, "b": 40}, 3, is_sequence_pipelined, max_tokens=6)
    for rid in requests:
        log = chunk_log(executor, rid)
        decodes = [entry for entry in log if entry[0] >= requests[rid].num_prompt_tokens]
        assert len(decodes) == 5  # the first token comes from the prefill
        previous = [entry for entry in log if entry[0] < requests[rid].num_prompt_tokens][-1:] + decodes
        for (_, _, prev_step), (_, dispatch_s, _) in itertools.pairwise(previous):
            assert dispatch_s >= executor.results_s[prev_step]
        assert requests[rid].num_output_tokens == 6


def test_without_sequence_pipelining_other_requests_still_fill_the_stages():
    """Ordinary pipeline parallelism across requests: b's prompt enters stage 0 as soon as a's has
    left it, and c's after b's."""
    executor, _ = run({"a": 16, "b": 16, "c": 16}, 3, is_sequence_pipelined=False)
    first = [(at_s, [c.request_id for c in plan.chunks]) for at_s, plan in executor.submitted[:3]]
    assert first == [(0.0, ["a"]), (STAGE_S, ["b"]), (2 * STAGE_S, ["c"])]


@pytest.mark.parametrize("is_sequence_pipelined", [True, False])
def test_preemption_mid_flight_loses_nothing(is_sequence_pipelined):
    """A cache too small for everyone: requests are preempted while their chunks are still in the
    pipeline. Their stale results are dropped, they are recomputed, and every one finishes."""
    prompts = {f"r{i}": 20 + 7 * i for i in range(5)}
    _, requests = run(prompts, 3, is_sequence_pipelined, max_tokens=12, num_blocks=24)
    for request in requests.values():
        assert request.num_output_tokens == 12
        assert request.num_inflight_tokens == request.num_stage0_tokens == 0
    assert sum(r.metrics.num_preemptions for r in requests.values()) > 0


def test_pipeline_depth_defaults_to_one_per_stage_and_is_checked():
    from mnemosyne.config import EngineConfig

    assert EngineConfig(pipeline_parallel_size=4, device="cpu").max_micro_batches == 4
    assert EngineConfig(pipeline_parallel_size=4, pipeline_depth=8, device="cpu").max_micro_batches == 8
    assert EngineConfig(device="cpu").max_micro_batches == 1
    with pytest.raises(ValueError, match="--pipeline-depth must be at least the stage count"):
        EngineConfig(pipeline_parallel_size=4, pipeline_depth=3)
    with pytest.raises(ValueError, match="--pipeline-depth needs more than one pipeline stage"):
        EngineConfig(pipeline_depth=2)
