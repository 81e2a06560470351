"""Token-budget scheduler with stall-free mixed batching.

Each step: requests that need one token (decodes) first, then every other request, running or
waiting, in the policy's order; the chunking policy sizes each one's chunk against the step's
budget (tokens, or predicted time). Blocks that run out are won back by preempting running
requests that arrived later: their blocks are freed and their tokens recomputed, so nothing is
lost, and since that order never changes two requests cannot keep preempting each other.

A request that yields budget to shorter work behind it gets back what that work left unused, when
that lets it finish its prompt in the step (`_take_back`).

With prefix caching, a waiting request is admitted with the longest cached prefix of its tokens:
those count as computed, and its first chunk starts after them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.kv.kvp_placement import NO_HIT, KvpPlacement
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan, StepResult
from mnemosyne.request import FinishReason, Request
from mnemosyne.scheduler.chunking import Chunking, FixedChunking, StepBudget
from mnemosyne.scheduler.policy import Policy

GroupBoundary = Callable[[int], "int | None"]
"""Given a chunk's first token index, the index at which the next KVP group starts (the chunk must
not cross it), or None."""


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int


class Scheduler:
    def __init__(self, limits: SchedulerLimits, pool: BlockPool | KvpPlacement, policy: Policy,
                 clock: Callable[[], float] = time.monotonic, chunking: Chunking | None = None,
                 group_boundary: GroupBoundary | None = None):
        self.limits = limits
        self.pool = pool if isinstance(pool, KvpPlacement) else KvpPlacement(1, pool.num_blocks, pool.block_size)
        """The KV blocks of every KVP group (one group: a single pool) and where each request sits."""
        self.policy = policy
        self.chunking = chunking or FixedChunking(limits.max_num_batched_tokens)
        self.group_boundary = group_boundary
        self.clock = clock
        self.max_model_len = min(limits.max_model_len, self.pool.max_request_tokens)
        """The longest request the cache can ever hold, whatever else runs."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._running_ids: set[str] = set()
        self._arrival_rank: dict[str, int] = {}
        """Order of add_request calls: preemption only ever frees requests that came later."""
        self._num_added = 0
        self._preempted_ids: set[str] = set()
        """Preempted in the step being scheduled: not readmitted in the same step."""
        self._freed_ids: list[str] = []
        self._seeds: dict[str, int] = {}
        self._step_id = 0
        self._stage0_cleared: set[int] = set()
        """Steps in flight whose micro-batch has left pipeline stage 0 (see `stage_cleared`)."""
        self._predicted_s: dict[int, float] = {}
        """Step id -> predicted time, for steps in flight (`observe_step`; the engine's `--ahead-lead-ms`)."""
        self._preempted_at: dict[str, int] = {}
        """Request id -> the last step planned before it was preempted: older plans' work for it is void."""
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
            raise ValueError(f"the prompt has {n} tokens, more than {self.pool.limit_text}")
        # what the prefix cache holds now: an estimate of the work left, until the request is admitted
        request.num_cached_tokens = min(self.pool.lookup(request).num_tokens, n)
        self.requests[request.request_id] = request
        self._seeds[request.request_id] = seed
        self._arrival_rank[request.request_id] = self._num_added
        self._num_added += 1
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
    def can_schedule_ahead(self, with_chunks: bool = False) -> bool:
        """Whether the next step may be planned before the one in flight lands (async scheduling, one
        pipeline stage). Without `with_chunks`, only when it would hold decodes alone, every one of
        them the next token of a request whose step in flight samples it; anything else (a waiting
        request, a prompt not fully dispatched) waits for the landing. With it (the engine plans such a
        step just before the one in flight ends, so that arrivals still join it), also when there are
        prompt tokens to dispatch or requests waiting. The caller marks the step in flight as past
        stage 0 (`stage_cleared`): with one stage, the device runs the two in order."""
        if with_chunks and (self.waiting or any(r.num_uncomputed_tokens > 0 for r in self.running)):
            return True
        return (not self.waiting and bool(self.running)
                and all(r.num_uncomputed_tokens == 0 for r in self.running)
                and any(self._can_decode_ahead(r) for r in self.running))

    def schedule(self, ahead: bool = False) -> StepPlan:
        """Pick this step's tokens. Marks them in flight on each request; `update` lands them.

        `ahead` (see `can_schedule_ahead`): also plan decodes of the tokens the step in flight is
        sampling, first. Their chunks start at the request's token count; the workers take the token
        from that step's sample on the device, so the plan needs no token id. The rest of the step is
        planned as usual around them: prompt chunks (their tokens are known) and admissions, where
        `can_schedule_ahead(with_chunks=True)` allowed any."""
        now = self.clock()
        self._preempted_ids.clear()
        step = self.chunking.new_step()
        chunks: list[ScheduledChunk] = []
        new_requests: list[NewRequest] = []
        scheduled: set[str] = set()
        candidates = self._candidates(now, ahead)
        shortest_after = _shortest_after(candidates)
        is_admitting = True
        yielded: list[Request] = []
        """Requests whose chunk was cut short for shorter work behind them (see `_take_back`)."""
        for i, request in enumerate(candidates):
            if step.is_full:
                break
            is_running = request.request_id in self._running_ids
            if request.request_id in self._preempted_ids:
                continue  # preempted earlier in this loop
            if request.num_uncomputed_tokens == 0:
                if ahead and is_running and self._can_decode_ahead(request):
                    self._add_decode_ahead(step, request, chunks, scheduled)
                continue  # otherwise waiting on in-flight tokens
            if request.num_stage0_tokens:
                continue  # its previous chunk has not left pipeline stage 0 yet
            if not is_running and (not is_admitting or len(self.running) >= self.limits.max_num_seqs):
                continue
            behind = shortest_after[i + 1]
            if is_running:
                start = request.num_computed_tokens + request.num_inflight_tokens
                num_new, cut_short = self._fit(step, request, start, behind, now)
                if cut_short:
                    yielded.append(request)
                if num_new == 0 or not self._reserve(request, num_new, scheduled):
                    continue
            else:
                admitted, cut_short = self._admit(step, request, behind, now)
                if admitted is None:
                    is_admitting = False  # a less urgent request must not overtake one blocked on memory
                if not admitted:
                    continue
                num_new = admitted
                if cut_short:
                    yielded.append(request)
            step.add(num_new, request.num_computed_tokens + request.num_inflight_tokens)
            chunks.append(self._chunk(request, num_new, new_requests))
            scheduled.add(request.request_id)
        self._take_back(step, yielded, chunks, new_requests, scheduled)
        plan = self._next_plan(new_requests, chunks)
        if step.estimate is not None and chunks:
            self._predicted_s[plan.step_id] = step.estimate.time_s
        return plan

    def _add_decode_ahead(self, step: StepBudget, request: Request, chunks: list[ScheduledChunk],
                          scheduled: set[str]) -> None:
        start = request.num_tokens
        if step.fit(start, 1, 0.0) == 0 or not self._reserve(request, 1, scheduled):
            return
        step.add(1, start)
        chunks.append(self._chunk(request, 1, []))
        scheduled.add(request.request_id)

    def _next_plan(self, new_requests: list[NewRequest], chunks: list[ScheduledChunk]) -> StepPlan:
        """The next step's plan, carrying the requests freed since the last one."""
        self._step_id += 1
        plan = StepPlan(self._step_id, tuple(new_requests), tuple(chunks), tuple(self._freed_ids))
        self._freed_ids.clear()
        return plan

    def _can_decode_ahead(self, request: Request) -> bool:
        """`Request.can_decode_ahead`, unless that token would open the request's next KVP group: that
        group holds none of it yet, so no sample reaches it on the device; it waits for the landing."""
        position = request.num_tokens
        opens_group = self.group_boundary is not None and self.group_boundary(position - 1) == position
        return request.can_decode_ahead(self.max_model_len) and not opens_group

    def predicted_s(self, step_id: int) -> float | None:
        """The step-time model's prediction for a step in flight (None without a model or once observed)."""
        return self._predicted_s.get(step_id)

    def observe_step(self, plan: StepPlan, measured_s: float | None) -> float | None:
        """The plan's step is over, after measured_s of wall time (None: not measured, as under pipeline
        stages, where steps overlap). A step that held a prefill chunk tells the chunking how its
        predicted time compared. Returns the step's prediction (None without one)."""
        predicted_s = self._predicted_s.pop(plan.step_id, None)
        if predicted_s is not None and measured_s is not None and any(c.num_new_tokens > 1 for c in plan.chunks):
            self.chunking.observe(predicted_s, measured_s)
        return predicted_s

    def _candidates(self, now_s: float, ahead: bool = False) -> list[Request]:
        """Running and waiting requests in the policy's order, decodes first (stable). Ahead of a step in
        flight, a request whose next token that step samples is a decode too."""
        ordered = self.policy.order([*self.running, *self.waiting], now_s)
        ordered.sort(key=lambda r: not (r.num_uncomputed_tokens == 1 or (ahead and r.num_uncomputed_tokens == 0)))
        return ordered

    def _fit(self, step: StepBudget, request: Request, start: int, behind: Request | None,
             now_s: float) -> tuple[int, bool]:
        """The request's chunk from token `start` on: the chunking policy's choice, clipped at its next
        KVP group boundary. It yields part of the budget only when shorter work waits behind it
        (`behind`, the request with the fewest tokens to compute after it in the order). Also whether
        the chunk left some of the prompt to a later step while it yielded (see `_take_back`)."""
        max_new = self._max_chunk(request, start)
        if max_new <= 0:
            return 0, False
        share = self._yield_share(request, max_new, behind, now_s)
        num_new = step.fit(start, max_new, share)
        return num_new, num_new < max_new and share > 0

    def _max_chunk(self, request: Request, start: int) -> int:
        """The request's tokens from `start` on, up to its next KVP group boundary."""
        max_new = request.num_tokens - start
        boundary = self.group_boundary(start) if self.group_boundary else None
        return max_new if boundary is None else min(max_new, boundary - start)

    def _yield_share(self, request: Request, max_new: int, behind: Request | None, now_s: float) -> float:
        # Shorter by tokens, or riding along: a long prompt's last few hundred tokens, each over its
        # whole prefix, are fewer than a chat prompt's but far more work (call62: a short prompt that
        # arrived in a 162K-token prompt's last 0.3 s waited 0.25 s for its first token).
        is_shorter = behind is not None and (_tokens_to_compute(behind) < max_new
                                             or self.policy.rides_along(request, behind))
        return self.policy.yield_share(request, now_s, behind) if is_shorter else 0.0

    def _take_back(self, step: StepBudget, yielded: list[Request], chunks: list[ScheduledChunk],
                   new_requests: list[NewRequest], scheduled: set[str]) -> None:
        """Give the budget that shorter work left unused back to the requests that yielded it, in order,
        where it lets one finish its prompt in this step: its first token comes a whole step sooner,
        for a longer step. (Given to every yielder, a long prompt's chunk would fill the step that a
        short prompt's first token waits for.) In call90 and call93's step logs, a 1,838-token chat
        prompt yielded its remainder to a 170-token one, which then ran alone in a 10-22 ms step, and
        it took three steps to its first token. The grown chunk counts as a second sequence in the
        step's estimate: a slight overestimate."""
        index = {chunk.request_id: i for i, chunk in enumerate(chunks)}
        for request in yielded:
            if step.is_full:
                return
            if request.request_id in self._preempted_ids:
                continue  # preempted later in the loop (or by itself, short of blocks): its blocks are gone
            i = index.get(request.request_id)
            first = chunks[i] if i is not None else None
            start = request.num_computed_tokens + request.num_inflight_tokens
            chunk_start = start if first is None else first.start
            rest = request.num_tokens - start
            if rest <= 0 or self._max_chunk(request, chunk_start) < start - chunk_start + rest:
                continue  # its prompt goes on past a KVP group boundary
            if step.fit(start, rest, 0.0) < rest or not self._reserve(request, rest, scheduled):
                continue
            step.add(rest, start)
            if first is None:
                chunks.append(self._chunk(request, rest, new_requests))
                scheduled.add(request.request_id)
            else:
                chunks[i] = self._grow(request, first, rest)

    def _grow(self, request: Request, chunk: ScheduledChunk, num_more: int) -> ScheduledChunk:
        """The request's chunk in the step being planned, num_more tokens longer (their blocks reserved)."""
        new_block_ids = chunk.new_block_ids + tuple(request.block_ids[request.num_synced_blocks:])
        request.num_synced_blocks = len(request.block_ids)
        request.num_inflight_tokens += num_more
        request.num_stage0_tokens += num_more
        return replace(chunk, num_new_tokens=chunk.num_new_tokens + num_more, new_block_ids=new_block_ids)

    def stage_cleared(self, plan: StepPlan) -> None:
        """Pipeline stage 0 finished the plan's micro-batch: its requests' next chunks may be scheduled
        now (sequence pipelining). Their KV dependencies on this chunk are met in every stage because
        each stage runs micro-batches in plan order. Idempotent; `update` does it if nobody did."""
        if plan.step_id in self._stage0_cleared:
            return
        self._stage0_cleared.add(plan.step_id)
        for chunk in plan.chunks:
            request = self._live(chunk.request_id, plan)
            if request is not None:
                request.num_stage0_tokens -= chunk.num_new_tokens

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Land a finished step: computed counts, sampled tokens, stop checks. Returns the requests
        that got a token (finished ones included, with finish_reason set). Steps land in plan order."""
        now = self.clock()
        self.stage_cleared(plan)
        self._stage0_cleared.discard(plan.step_id)
        for chunk in plan.chunks:
            request = self._live(chunk.request_id, plan)
            if request is not None:
                request.num_inflight_tokens -= chunk.num_new_tokens
                request.num_computed_tokens += chunk.num_new_tokens
                self.pool.cache_computed(request, request.num_computed_tokens)
        updated = []
        for request_id, token_id in zip(result.request_ids, result.token_ids, strict=True):
            request = self._live(request_id, plan)
            if request is None:
                continue  # aborted or preempted while its step ran
            request.append_token(token_id)
            request.metrics.record_token(now)
            reason = request.check_stop(self.max_model_len)
            if reason is not None:
                self._finish(request, reason)
            updated.append(request)
        return updated

    # -- helpers ---------------------------------------------------------------------------
    def _live(self, request_id: str, plan: StepPlan) -> Request | None:
        """The request the plan's work belongs to; None if it has finished, or was preempted after
        the plan was made (with several steps in flight a request can be preempted mid-flight)."""
        request = self.requests.get(request_id)
        if request is None or self._preempted_at.get(request_id, -1) >= plan.step_id:
            return None
        return request

    def _admit(self, step: StepBudget, request: Request, behind: Request | None,
               now_s: float) -> tuple[int | None, bool]:
        """Move a waiting request to running with blocks for its first chunk, if they are free, and
        return the chunk's size: 0 if the budget has no room for it (it stays waiting), None if the
        blocks are short; with it, whether the chunk was cut short while yielding (`_fit`). The longest
        cached prefix is reused and counts as computed; if its KVP groups cannot take the request now,
        it is tried without it. A request spanning several KVP groups reserves all it can ever need in
        each of them."""
        final_len = min(request.num_prompt_tokens + request.params.max_tokens, self.max_model_len)
        hit = self.pool.lookup(request)
        for attempt in (hit, NO_HIT) if hit.num_tokens else (hit,):
            # tokens computed before admission: 0, unless the caller wrote the prompt's KV by other means
            # (the benchmarks' random-KV mode, which times a 1M-token decode without its prefill)
            num_computed = max(attempt.num_tokens, request.num_computed_tokens)
            num_new, cut_short = self._fit(step, request, num_computed, behind, now_s)
            if num_new == 0:
                return 0, False
            if self.pool.admit(request, num_computed + num_new, final_len, attempt):
                request.num_computed_tokens = num_computed
                request.num_cached_tokens = min(attempt.num_tokens, request.num_prompt_tokens)
                self.waiting.remove(request)
                self.running.append(request)
                self._running_ids.add(request.request_id)
                return num_new, cut_short
        return None, False

    def _reserve(self, request: Request, num_new: int, scheduled: set[str]) -> bool:
        """Give a running request blocks for num_new more tokens, preempting unscheduled requests that
        arrived after it (in its KVP group), latest first. False if it cannot fit this step (it may have
        preempted itself)."""
        num_tokens = request.num_computed_tokens + request.num_inflight_tokens + num_new
        rank = self._arrival_rank[request.request_id]
        while self.pool.blocks_short(request, num_tokens):
            later = [r for r in self.running if r.request_id not in scheduled and self._arrival_rank[r.request_id] > rank
                     and self.pool.frees_blocks_for(r, request)]
            if not later:
                self._preempt(request)
                return False
            self._preempt(max(later, key=lambda r: self._arrival_rank[r.request_id]))
        self.pool.allocate(request, num_tokens)
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
        request.num_stage0_tokens += num_new
        if request.metrics.first_scheduled_s is None:
            request.metrics.first_scheduled_s = self.clock()
        return ScheduledChunk(request.request_id, start, num_new, new_block_ids, new_token_ids)

    def _release(self, request: Request) -> None:
        self.pool.free(request)
        request.block_ids = []
        if request.num_synced_tokens:
            self._freed_ids.append(request.request_id)
        request.num_synced_tokens = request.num_synced_blocks = 0

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        self._running_ids.discard(request.request_id)
        self._preempted_ids.add(request.request_id)
        request.num_computed_tokens = request.num_inflight_tokens = request.num_stage0_tokens = 0
        self._preempted_at[request.request_id] = self._step_id
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, request)

    def _finish(self, request: Request, reason: FinishReason) -> Request:
        request.finish_reason = reason
        request.metrics.finished_s = self.clock()
        self._release(request)
        if request.request_id in self._running_ids:
            self.running.remove(request)
            self._running_ids.discard(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        del self.requests[request.request_id]
        del self._seeds[request.request_id]
        del self._arrival_rank[request.request_id]
        self._preempted_at.pop(request.request_id, None)
        return request


def _tokens_to_compute(request: Request) -> int:
    """Tokens a request may still be given (a waiting request's cached prefix is not work)."""
    return min(request.num_uncomputed_tokens, request.num_tokens - request.num_cached_tokens)


def _shortest_after(requests: Sequence[Request]) -> list[Request | None]:
    """[i] = the request among requests[i:] with the fewest tokens left to compute, of those with any
    that may be scheduled now (not one whose tokens are all in flight, or whose previous chunk is still
    in pipeline stage 0: yielding to it would leave the budget unused); one more entry, None, for the
    end."""
    shortest: list[Request | None] = [None] * (len(requests) + 1)
    for i in range(len(requests) - 1, -1, -1):
        r, best = requests[i], shortest[i + 1]
        schedulable = _tokens_to_compute(r) > 0 and not r.num_stage0_tokens
        shortest[i] = r if schedulable and (best is None or _tokens_to_compute(r) < _tokens_to_compute(best)) \
            else best
    return shortest
