"""Token-budget scheduler with stall-free mixed batching.

Each step: running requests that need one token (decodes) first, then the other running ones,
then waiting ones, each taking up to the remaining token budget. Blocks that run out are won back
by preempting the least urgent unscheduled request: its blocks are freed and its tokens
recomputed later, so nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan, StepResult
from mnemosyne.request import FinishReason, Request
from mnemosyne.scheduler.policy import Policy


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int


class Scheduler:
    def __init__(self, limits: SchedulerLimits, pool: BlockPool, policy: Policy,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.pool = pool
        self.policy = policy
        self.clock = clock
        self.max_model_len = min(limits.max_model_len, pool.num_blocks * pool.block_size)
        """The longest request the cache can ever hold, whatever else runs."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._freed_ids: list[str] = []
        self._seeds: dict[str, int] = {}
        self._step_id = 0
        self.num_preemptions = 0

    # -- admission -------------------------------------------------------------------------
    def add_request(self, request: Request, seed: int) -> None:
        """Queue a request; raises ValueError at once if it can never run."""
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if n > self.limits.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than max_model_len ({self.limits.max_model_len})")
        if n > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than the whole KV cache holds ({self.max_model_len})")
        self.requests[request.request_id] = request
        self._seeds[request.request_id] = seed
        self.waiting.append(request)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish requests with reason ABORT and free their blocks at once; unknown ids are ignored."""
        return [self._finish(self.requests[r], FinishReason.ABORT) for r in request_ids if r in self.requests]

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """End a request for a reason found outside the scheduler (a stop string)."""
        if request_id in self.requests:
            self._finish(self.requests[request_id], reason)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Pick this step's tokens. Marks them in flight on each request; `update` lands them."""
        budget = self.limits.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        new_requests: list[NewRequest] = []
        now = self.clock()
        ordered = self.policy.order(self.running, now)
        ordered.sort(key=lambda r: r.num_uncomputed_tokens != 1)  # stable: decodes first
        scheduled: set[str] = set()
        for request in ordered:
            if budget == 0:
                break
            if request.request_id not in self.requests or request.num_uncomputed_tokens == 0:
                continue  # preempted earlier in this loop, or waiting on in-flight tokens
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self._reserve(request, num_new, scheduled):
                continue
            chunks.append(self._chunk(request, num_new, new_requests))
            scheduled.add(request.request_id)
            budget -= num_new
        for request in self.policy.order(self.waiting, now):
            if budget == 0 or len(self.running) >= self.limits.max_num_seqs:
                break
            num_new = min(request.num_uncomputed_tokens, budget)
            if self.pool.blocks_for(request.num_computed_tokens + num_new) > self.pool.num_free_blocks:
                break  # keep arrival order: a later request must not overtake a blocked one
            self._reserve(request, num_new, scheduled)
            self.waiting.remove(request)
            self.running.append(request)
            chunks.append(self._chunk(request, num_new, new_requests))
            scheduled.add(request.request_id)
            budget -= num_new
        self._step_id += 1
        plan = StepPlan(self._step_id, tuple(new_requests), tuple(chunks), tuple(self._freed_ids))
        self._freed_ids.clear()
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Land a finished step: computed counts, sampled tokens, stop checks. Returns the requests
        that got a token (finished ones included, with finish_reason set)."""
        now = self.clock()
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None:
                request.num_inflight_tokens -= chunk.num_new_tokens
                request.num_computed_tokens += chunk.num_new_tokens
        updated = []
        for request_id, token_id in zip(result.request_ids, result.token_ids, strict=True):
            request = self.requests.get(request_id)
            if request is None:
                continue  # aborted while its step ran
            request.append_token(token_id)
            request.metrics.record_token(now)
            reason = request.check_stop(self.max_model_len)
            if reason is not None:
                self._finish(request, reason)
            updated.append(request)
        return updated

    # -- helpers ---------------------------------------------------------------------------
    def _reserve(self, request: Request, num_new: int, scheduled: set[str]) -> bool:
        """Give the request blocks for num_new more tokens, preempting the least urgent unscheduled
        running requests if needed. False if it cannot fit this step (it may have preempted itself)."""
        needed = self.pool.blocks_for(request.num_computed_tokens + num_new) - len(request.block_ids)
        while needed > self.pool.num_free_blocks:
            victims = [r for r in self.running if r.request_id not in scheduled and r is not request]
            victim = self.policy.order(victims, self.clock())[-1] if victims else None
            if victim is None:
                if request in self.running:
                    self._preempt(request)
                return False
            self._preempt(victim)
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        return True

    def _chunk(self, request: Request, num_new: int, new_requests: list[NewRequest]) -> ScheduledChunk:
        start = request.num_computed_tokens + request.num_inflight_tokens
        if request.num_synced_tokens == 0:
            new_requests.append(NewRequest(request.request_id, request.token_ids[:],
                                           request.params, self._seeds[request.request_id]))
            new_block_ids, new_token_ids = tuple(request.block_ids), ()
        else:
            new_block_ids = tuple(request.block_ids[request.num_synced_blocks:])
            new_token_ids = tuple(request.token_ids[request.num_synced_tokens:])
        request.num_synced_tokens = request.num_tokens
        request.num_synced_blocks = len(request.block_ids)
        request.num_inflight_tokens += num_new
        if request.metrics.first_scheduled_s is None:
            request.metrics.first_scheduled_s = self.clock()
        return ScheduledChunk(request.request_id, start, num_new, new_block_ids, new_token_ids)

    def _release(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        if request.num_synced_tokens:
            self._freed_ids.append(request.request_id)
        request.num_synced_tokens = request.num_synced_blocks = 0

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.num_computed_tokens = request.num_inflight_tokens = 0
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, request)

    def _finish(self, request: Request, reason: FinishReason) -> Request:
        request.finish_reason = reason
        request.metrics.finished_s = self.clock()
        self._release(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        del self.requests[request.request_id]
        del self._seeds[request.request_id]
        return request
