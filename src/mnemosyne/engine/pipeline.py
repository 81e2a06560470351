"""Micro-batches in flight through the pipeline stages, as the engine core sees them: at most
`depth` (by default one per stage), and a new one enters only when stage 0 is free. A stage-0
report releases the next chunks of the micro-batch's requests (sequence pipelining); results land
in step order."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Protocol

from mnemosyne.config import default_pipeline_depth
from mnemosyne.engine.trace import PipelineTrace
from mnemosyne.plan import StageDone, StepEvent, StepPlan, StepResult
from mnemosyne.scheduler.scheduler import Scheduler


class StepExecutor(Protocol):
    """The executor as the pipeline drives it (in-process, or worker processes)."""

    @property
    def num_stages(self) -> int: ...

    def submit(self, plan: StepPlan) -> None:
        """Start the plan; every stage runs plans in submission order."""

    def wait_events(self, timeout_s: float | None = None) -> list[StepEvent]:
        """Events of submitted steps, waiting up to timeout_s for the first (None: until one comes)."""
        ...


@dataclass
class _MicroBatch:
    plan: StepPlan
    has_cleared_stage0: bool = False


class Pipeline:
    """Submits plans and turns executor events into scheduler calls.

    With `is_sequence_pipelined`, stage 0's report of a micro-batch calls `scheduler.stage_cleared`,
    so a prefill's next chunk may enter stage 0 while this one is still in later stages. Without,
    the report only frees stage 0 for other requests' work, and a request's next chunk waits until
    `scheduler.update` lands the step. A decode token always waits for its predecessor's sample.
    """

    def __init__(self, executor: StepExecutor, scheduler: Scheduler, is_sequence_pipelined: bool,
                 trace: PipelineTrace | None = None, depth: int | None = None):
        self.executor = executor
        self.scheduler = scheduler
        self.is_sequence_pipelined = is_sequence_pipelined
        self.trace = trace
        self.depth = depth or default_pipeline_depth(executor.num_stages)
        """Micro-batches in flight at most. With one per stage, stage 0 idles each time a long prompt's
        chunks halve: it finishes a short chunk while the later stages still run longer ones, and waits
        for the oldest to leave the last stage (call58's trace: three waits of 75-134 ms at each of the
        four halvings of a 1M prefill at pp=4, 1.1 s of stage 0's time). Twice as many did not shorten
        that prefill (call68), so one per stage is the default."""
        self._inflight: dict[int, _MicroBatch] = {}
        """Step id -> micro-batch, oldest first."""
        self._freed_ids: tuple[str, ...] = ()
        """Freed by plans that had no chunks (so were not sent): they ride on the next plan sent."""
        self._submitted: StepPlan | None = None
        """The latest plan sent since the last `advance` returned."""
        self.last_plan: StepPlan | None = None
        """The plan the latest `advance` submitted, else the latest it landed, else one still in
        flight: None only when the pipeline is idle."""

    @property
    def has_room(self) -> bool:
        """Whether a new micro-batch may enter: stage 0 is free and not every stage is busy."""
        return len(self._inflight) < self.depth and all(m.has_cleared_stage0 for m in self._inflight.values())

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def oldest_plan(self) -> StepPlan | None:
        """The plan of the oldest micro-batch in flight, the next to land."""
        return next((m.plan for m in self._inflight.values()), None)

    def advance(self, plan: StepPlan | None, timeout_s: float | None = None) -> list[tuple[StepPlan, StepResult]]:
        """Submit `plan` (if it has chunks), then wait until the pipeline moves: a micro-batch clears
        stage 0 or a step finishes, or timeout_s passes (None: no limit). Returns the finished steps,
        oldest first, for `scheduler.update`; stage-0 reports have already gone to the scheduler.
        Returns at once when nothing is in flight."""
        if plan is not None:
            self.submit(plan)
        finished: list[tuple[StepPlan, StepResult]] = []
        has_moved = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._inflight and not has_moved:
            left_s = None if deadline is None else deadline - time.monotonic()
            if left_s is not None and left_s <= 0:
                break
            for event in self.executor.wait_events(left_s):
                has_moved |= self._on_event(event, finished)
        self.last_plan = self._submitted or (finished[-1][0] if finished else None) or self.oldest_plan
        self._submitted = None
        return finished

    def submit(self, plan: StepPlan) -> StepPlan | None:
        """Send a plan to the executor now, whether or not stage 0 is free: the engine's own choice when
        it plans a step ahead (async scheduling). Returns the plan sent, or None if it had no chunks."""
        submitted = self._submit(plan)
        self._submitted = submitted or self._submitted
        return submitted

    def close(self, timeout_s: float = 2.0) -> None:
        """Write the trace once late stage reports are in (up to timeout_s; after a worker failure,
        what arrived before it)."""
        if self.trace is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            while not self.trace.is_complete and (left_s := deadline - time.monotonic()) > 0:
                for event in self.executor.wait_events(min(left_s, 0.05)):
                    self._on_event(event, [])
        except RuntimeError:  # a worker failed: the engine has already raised it
            pass
        finally:
            self.trace.write()

    def _submit(self, plan: StepPlan) -> StepPlan | None:
        if not plan.chunks:
            self._freed_ids += plan.freed_ids
            return None
        if self._freed_ids:  # freed first: a request freed then re-added is rebuilt, not lost
            plan = replace(plan, freed_ids=self._freed_ids + plan.freed_ids)
            self._freed_ids = ()
        self.executor.submit(plan)
        self._inflight[plan.step_id] = _MicroBatch(plan)
        if self.trace is not None:
            self.trace.add_plan(plan)
        return plan

    def _on_event(self, event: StepEvent, finished: list[tuple[StepPlan, StepResult]]) -> bool:
        """Apply one event; True if the pipeline moved (stage 0 freed, or a step finished)."""
        if isinstance(event, StageDone):
            if self.trace is not None:
                self.trace.record(event)
            batch = self._inflight.get(event.step_id)
            if event.pp_rank != 0 or event.kvp_rank != 0 or batch is None or batch.has_cleared_stage0:
                return False  # only stage 0 of replica 0 paces the engine; the rest are for the trace
            batch.has_cleared_stage0 = True
            if self.is_sequence_pipelined:
                self.scheduler.stage_cleared(batch.plan)
            return True
        batch = self._inflight.pop(event.step_id)
        finished.append((batch.plan, event))
        return True
