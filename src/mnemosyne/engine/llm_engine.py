"""LLMEngine: the step loop. One step = schedule, execute, update, emit; with pipeline stages a
step submits one micro-batch and lands whatever finished meanwhile (engine/pipeline.py). With one
stage and async scheduling, the next step is planned and queued while the previous one runs, so the
device does not wait for the host between steps: a decode-only step at once, a step with prefill work
(--async-prefill) just before the step in flight should end, so that requests arriving meanwhile
join it."""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mnemosyne.config import EngineConfig
from mnemosyne.engine.detokenizer import IncrementalDetokenizer
from mnemosyne.engine.outputs import CompletionOutput, RequestOutput
from mnemosyne.engine.pipeline import Pipeline
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.trace import PipelineTrace
from mnemosyne.models.loaders import resolve_model
from mnemosyne.plan import WARM_UP_REQUEST_ID, StepPlan, StepResult, TokenLogprobs
from mnemosyne.request import FinishReason, Request, SamplingParams
from mnemosyne.scheduler.factory import build_scheduler, latency_model_for

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """Engine-side view of a request beyond the scheduler's: prompt text, detokenizer, logprobs."""

    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    prompt_token_ids: Sequence[int]
    """array('i'): a long prompt is never a Python list here."""
    logprobs: list[TokenLogprobs] | None
    output_token_ids: list[int] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        loader = resolve_model(config.model, seed=config.seed)
        self.model_name = loader.name
        self.model_config = loader.load_config()
        self.tokenizer = loader.load_tokenizer()
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.executor = _make_executor(config, self.model_config, loader)
        info = self.executor.info
        self.scheduler = build_scheduler(config, self.model_config, info.num_kv_blocks, self.max_model_len,
                                         latency_model_for(config, self.model_config, info.device))
        trace = None if config.trace_file is None else PipelineTrace(
            config.trace_file, config.pipeline_parallel_size * config.kv_parallel_size)
        self.pipeline = Pipeline(self.executor, self.scheduler, config.sequence_pipelining, trace,
                                 config.max_micro_batches)
        self.step_log = None if config.step_log is None else StepLog(config.step_log)
        self.is_async = config.async_scheduling and config.pipeline_parallel_size == 1
        """Plan the next step while this one runs (see `Scheduler.can_schedule_ahead`)."""
        self.plans_prefill_ahead = self.is_async and (config.world_size == 1 if config.async_prefill is None
                                                      else config.async_prefill)
        """Steps with prefill work too, --ahead-lead-ms before the step in flight should end (and then
        decode-only steps as well); otherwise decode-only steps alone, as soon as the previous is queued."""
        self._ahead_lead_s = config.ahead_lead_ms / 1e3
        self._began_s: dict[int, float] = {}
        """Step id -> when its planning began, for steps in flight."""
        self._submitted_s: dict[int, float] = {}
        """Step id -> when it was queued, for steps in flight."""
        self._last_landed_s: float | None = None
        self.landed: list[tuple[StepPlan, float]] = []
        """The steps the latest `step` call landed, each with its time: as the scheduler's feedback
        measured it (one stage), else the call's."""
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._observes_steps = True
        """Whether step times reach the scheduler's TBT feedback (not during `_warm_up`)."""
        if config.warm_up and info.device.startswith("cuda"):
            self._warm_up()

    def _warm_up(self) -> None:
        """One prompt of the token cap (random ids, two output tokens: its prefill and one decode) run
        to completion before serving, chunked as the scheduler chooses. The first steps of a fresh
        process ran slow: call55's replay of a long prompt's arrival had a step at 1.56x its prediction,
        and the TBT feedback, whose quantile over a short window is near its largest ratio, then cut the
        step budget by a third for the steps after; serving runs saw such steps at the first long prompt
        (155 ms against 29 ms predicted). Here they cost start-up time, and their step times are not
        observed. The decode compiles what an eager decode needs: under pipeline stages (no CUDA graphs)
        the Triton GEMV compiled at a 1M prompt's first decode, 0.1-0.2 s on each stage (call58)."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len - 2)
        if num_tokens < 1:
            return
        started = time.perf_counter()
        ids = np.random.default_rng(self.config.seed).integers(self.model_config.vocab_size, size=num_tokens,
                                                               dtype=np.int32)
        try:
            self.add_request(array("i", ids.tobytes()), SamplingParams(max_tokens=2, ignore_eos=True),
                             WARM_UP_REQUEST_ID)
        except ValueError as e:  # a KV cache too small to ever hold it
            logger.info("no warm-up prompt: %s", e)
            return
        self._observes_steps = False
        try:
            while self.has_unfinished_requests():
                self.step()
        finally:
            self._observes_steps = True
        logger.info("warm-up prompt of %d tokens: %.2f s", num_tokens, time.perf_counter() - started)

    # -- requests --------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> array:
        """A prompt's token ids as array('i'), checked against the vocabulary. Ids already in an
        array('i') (as the server's engine core receives them) are checked in numpy and not copied:
        a Python loop over a million ids held the core loop, and every running request's next token,
        for 0.19 s (26 ms at 162K)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model_name} has no tokenizer: give prompts as token ids")
            return array("i", self.tokenizer.encode(prompt, add_special_tokens=False))
        vocab = self.model_config.vocab_size
        try:
            ids = prompt if isinstance(prompt, array) and prompt.typecode == "i" else array("i", prompt)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})") from None
        values = np.frombuffer(ids, dtype=np.int32)
        if values.size and (values.min() < 0 or values.max() >= vocab):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None, arrival_s: float | None = None,
                    priority: int = 0, deadline_s: float | None = None) -> str:
        """Tokenize and queue a request. Raises ValueError (and queues nothing) if it can never run.
        `priority` (lower is more urgent) and `deadline_s` (first token due this long after arrival)
        steer the deadline-aware schedulers."""
        request_id = request_id or f"req-{next(self._ids)}"
        token_ids = self.tokenize(prompt)
        request = Request(request_id, token_ids, params, self.eos_token_ids, arrival_s, priority, deadline_s)
        seed = params.seed if params.seed is not None else zlib.crc32(f"{self.config.seed}:{request_id}".encode())
        self.scheduler.add_request(request, seed)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop)
        logprobs = [] if params.logprobs is not None else None
        self._tracked[request_id] = _Tracked(request, prompt if isinstance(prompt, str) else None, detok,
                                             token_ids, logprobs)
        return request_id

    def abort_request(self, request_ids: Sequence[str]) -> None:
        """Free the requests' blocks at once; their next output says finish_reason 'abort'."""
        for request in self.scheduler.abort(request_ids):
            self._tracked.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and submit a micro-batch if stage 0 is free, wait for the pipeline to move, and
        return the outputs of the steps that finished (none, while the first micro-batches fill it).

        With async scheduling, the next step is planned while the one in flight runs. Under
        --async-prefill this call may instead return early, with nothing landed, when it is too soon to
        plan it: the caller takes in new requests and calls again, and they join that step."""
        began_s = time.perf_counter()
        plan = self.scheduler.schedule() if self.pipeline.has_room else None
        if plan is not None:
            self._submit(plan, began_s)
        timeout_s = self._plan_ahead() if self.is_async and self.pipeline.num_inflight == 1 else None
        finished = self.pipeline.advance(None, timeout_s)
        landed_s = time.perf_counter()
        outputs = []
        for done_plan, result in finished:
            updated = self.scheduler.update(done_plan, result)
            self._record_logprobs(result, {request.request_id for request in updated})
            outputs += [self._emit(request) for request in updated]
        self.landed = []
        for done_plan, _ in finished:
            measured_s, launch_s, queued = self._step_times(done_plan, landed_s)
            self.landed.append((done_plan, landed_s - began_s if measured_s is None else measured_s))
            if not self._observes_steps:
                continue
            predicted_s = self.scheduler.observe_step(done_plan, measured_s)
            if self.step_log is not None:
                feedback = getattr(self.scheduler.chunking, "feedback", None)
                self.step_log.record(done_plan, measured_s, predicted_s, feedback and feedback.factor, launch_s,
                                     queued)
        return outputs

    def _submit(self, plan: StepPlan, began_s: float) -> None:
        if self.pipeline.submit(plan) is not None:
            self._began_s[plan.step_id] = began_s
            self._submitted_s[plan.step_id] = time.perf_counter()

    def _plan_ahead(self) -> float | None:
        """Plan the next step while the one in flight runs, if it may be planned now. Returns how long to
        wait for the step in flight before returning to the caller, who takes in arrivals and calls
        again (it is too soon to plan: see `_expected_end_s`), or None to wait until it lands."""
        inflight = self.pipeline.oldest_plan
        expected_end_s = self._expected_end_s(inflight) if self.plans_prefill_ahead and inflight else None
        if expected_end_s is None:  # without --async-prefill or a prediction: decode-only steps, at once
            if self.scheduler.can_schedule_ahead():
                self._submit(self.scheduler.schedule(ahead=True), time.perf_counter())
            return None
        wait_s = expected_end_s - self._ahead_lead_s - time.perf_counter()
        if wait_s > 0:
            return wait_s
        self.scheduler.stage_cleared(inflight)  # one stage: the device runs the next step after it
        if self.scheduler.can_schedule_ahead(with_chunks=True):
            began_s = time.perf_counter()
            self._submit(self.scheduler.schedule(ahead=True), began_s)
        return None

    def _expected_end_s(self, plan: StepPlan) -> float | None:
        """When the step in flight should land: from its start (its submission, or the landing of the
        step it was queued behind), its predicted time × the median measured / predicted ratio of
        recent steps. None without a prediction."""
        predicted_s = self.scheduler.predicted_s(plan.step_id)
        submitted_s = self._submitted_s.get(plan.step_id)
        if predicted_s is None or submitted_s is None:
            return None
        feedback = getattr(self.scheduler.chunking, "feedback", None)
        started_s = max(submitted_s, self._last_landed_s or submitted_s)
        return started_s + predicted_s * (feedback.typical if feedback is not None else 1.0)

    def _step_times(self, plan: StepPlan, landed_s: float) -> tuple[float | None, float, bool]:
        """A landed step's measured time, how long its planning and launch held this thread, and whether
        it was queued behind a step in flight (submitted before the step before it landed: steps land
        in order). The measured time is the step's as its decodes saw it (one stage): since the previous
        step landed, or since its own planning began if the engine was idle in between. Steps planned
        ahead run back to back, so this is their device time plus any wait for the host. None under
        pipeline stages, where steps overlap."""
        began_s = self._began_s.pop(plan.step_id, landed_s)
        submitted_s = self._submitted_s.pop(plan.step_id, began_s)
        previous_s, self._last_landed_s = self._last_landed_s, landed_s
        queued = previous_s is not None and submitted_s < previous_s
        if self.config.pipeline_parallel_size > 1:
            return None, submitted_s - began_s, queued
        return landed_s - (began_s if previous_s is None else max(began_s, previous_s)), submitted_s - began_s, queued

    @property
    def last_plan(self) -> StepPlan | None:
        """For per-step stats in the engine-core process: the plan the latest step submitted, else
        the latest one it landed, else one still in flight; None only when nothing runs."""
        return self.pipeline.last_plan

    def _record_logprobs(self, result: StepResult, updated_ids: set[str]) -> None:
        """Keep the logprobs of tokens the scheduler accepted (not those of a request preempted or
        aborted while its step ran)."""
        for request_id, lp in zip(result.request_ids, result.logprobs, strict=True):
            tracked = self._tracked.get(request_id) if request_id in updated_ids else None
            if tracked is not None and tracked.logprobs is not None and lp is not None:
                tracked.logprobs.append(lp)

    def _emit(self, request: Request) -> RequestOutput:
        tracked = self._tracked[request.request_id]
        new_ids = list(request.token_ids[request.num_prompt_tokens + len(tracked.output_token_ids):])
        tracked.output_token_ids.extend(new_ids)
        if tracked.detokenizer.add(new_ids) and not request.is_finished:
            self.scheduler.finish(request.request_id, FinishReason.STOP)
        finished = request.is_finished
        completion = CompletionOutput(
            index=0, text=tracked.detokenizer.text, token_ids=tracked.output_token_ids,
            finish_reason=request.finish_reason.value if finished else None,
            logprobs=tracked.logprobs, new_text=tracked.detokenizer.release(finished), new_token_ids=new_ids)
        if finished:
            del self._tracked[request.request_id]
        return RequestOutput(request.request_id, tracked.prompt, tracked.prompt_token_ids,
                             [completion], finished, request.metrics, request.num_computed_tokens,
                             request.num_cached_tokens)

    def shutdown(self) -> None:
        try:
            self.pipeline.close()  # writes --trace-file
            if self.step_log is not None:
                self.step_log.close()
        finally:
            self.executor.shutdown()


def _make_executor(config: EngineConfig, model_config, loader):
    """In-process for one device; spawned workers for several on one node; under torchrun, the
    launched processes (ranks other than 0 become workers here and never return)."""
    from mnemosyne.executor.torchrun import torchrun_env

    env = torchrun_env()
    if env is not None and env.world_size > 1:
        from mnemosyne.executor.torchrun import torchrun_executor

        return torchrun_executor(config, model_config, env)
    if config.world_size == 1:
        from mnemosyne.executor.inprocess import InProcessExecutor

        return InProcessExecutor(config, model_config, loader)
    from mnemosyne.executor.multiproc import spawn_executor

    return spawn_executor(config, model_config)
