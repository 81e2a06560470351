"""The simulator: the engine's own scheduler against a simulated executor that advances a virtual
clock by the step-time model's prediction. Requests carry real (zero-filled) token arrays and the
executor keeps only token counts, so per-step cost grows with the batch, never with the context."""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.plan import StepPlan, StepResult
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.factory import build_scheduler, layout_of
from mnemosyne.scheduler.latency_model import DeviceSpec, LatencyModel, Layout
from mnemosyne.scheduler.scheduler import Scheduler
from mnemosyne.sim.trace import TraceRequest

_SAMPLED_TOKEN = 1
"""Every simulated sample; never a stop token (simulated requests have none)."""


class VirtualClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class SimExecutor:
    """Stands in for the workers: lands a plan at once and says how long it would have taken.
    Keeps, per request, only the number of tokens the workers would hold."""

    def __init__(self, latency: LatencyModel):
        self.latency = latency
        self._num_tokens: dict[str, int] = {}

    def execute(self, plan: StepPlan) -> tuple[StepResult, float]:
        """The step's result (one token for each chunk that reaches its request's end) and its
        predicted time in seconds."""
        for request_id in plan.freed_ids:
            self._num_tokens.pop(request_id, None)
        for new in plan.new_requests:
            self._num_tokens[new.request_id] = len(new.token_ids)
        estimate = self.latency.estimate()
        sampled = []
        for chunk in plan.chunks:
            num_tokens = self._num_tokens[chunk.request_id] + len(chunk.new_token_ids)
            self._num_tokens[chunk.request_id] = num_tokens
            estimate.add(chunk.num_new_tokens, chunk.start)
            if chunk.start + chunk.num_new_tokens == num_tokens:
                sampled.append(chunk.request_id)
        n = len(sampled)
        return StepResult(plan.step_id, tuple(sampled), (_SAMPLED_TOKEN,) * n, (None,) * n), estimate.time_s


@dataclass
class StepSeries:
    """One entry per simulated step."""

    start_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_decodes: list[int] = field(default_factory=list)
    """Requests given exactly one token."""
    num_running: list[int] = field(default_factory=list)
    num_waiting: list[int] = field(default_factory=list)

    def record(self, start_s: float, step_s: float, plan: StepPlan, scheduler: Scheduler) -> None:
        self.start_s.append(start_s)
        self.step_s.append(step_s)
        self.num_tokens.append(plan.num_tokens)
        self.num_decodes.append(sum(1 for c in plan.chunks if c.num_new_tokens == 1))
        self.num_running.append(len(scheduler.running))
        self.num_waiting.append(len(scheduler.waiting))


@dataclass
class SimResult:
    requests: list[Request]
    """Every request of the trace, finished, with its virtual-time metrics."""
    steps: StepSeries
    num_preemptions: int
    wall_s: float
    """Real time the simulation took."""


def kv_capacity_tokens(model: ModelConfig, layout: Layout, device: DeviceSpec, config: EngineConfig) -> int:
    """KV tokens one KVP group holds: per device, the memory left after its weight shard (or
    --kv-cache-memory GiB), over its bytes per token."""
    b = device.dtype_bytes
    weight_bytes = (model.num_params_non_embedding + 2 * model.vocab_size * model.hidden_size) * b
    if config.kv_cache_memory is not None:
        kv_bytes = config.kv_cache_memory * 2**30
    else:
        kv_bytes = (device.memory_bytes - weight_bytes / (layout.tp * layout.pp)) * config.kv_cache_memory_fraction
    per_token = 2 * model.num_layers / layout.pp * max(1, model.num_kv_heads // layout.tp) * model.head_dim * b
    return max(0, int(kv_bytes // per_token))


def simulate(trace: Sequence[TraceRequest], config: EngineConfig, model: ModelConfig, latency: LatencyModel,
             device: DeviceSpec, max_model_len: int | None = None) -> SimResult:
    """Run the trace to completion under the scheduler `config` describes; deterministic."""
    started = time.perf_counter()
    clock = VirtualClock()
    capacity = kv_capacity_tokens(model, layout_of(config), device, config)
    longest = max(r.num_prompt_tokens + r.num_output_tokens for r in trace)
    # trace requests have no token ids (the sim gives them zeros): a prefix cache would match them all
    scheduler = build_scheduler(replace(config, enable_prefix_caching=False), model, capacity // config.block_size,
                                max_model_len or config.max_model_len or longest, latency, clock)
    executor = SimExecutor(latency)
    pending = sorted(trace, key=lambda r: r.arrival_s)
    requests: list[Request] = []
    steps = StepSeries()
    while len(requests) < len(pending) or scheduler.has_unfinished:
        while len(requests) < len(pending) and pending[len(requests)].arrival_s <= clock.now_s:
            requests.append(_admit(scheduler, pending[len(requests)], len(requests)))
        plan = scheduler.schedule()
        if not plan.chunks:
            executor.execute(StepPlan(plan.step_id, plan.new_requests, (), plan.freed_ids))
            if len(requests) == len(pending):
                raise RuntimeError("the simulated scheduler is stuck: requests left, none schedulable")
            clock.now_s = max(clock.now_s, pending[len(requests)].arrival_s)
            continue
        result, step_s = executor.execute(plan)
        start_s = clock.now_s
        clock.now_s += step_s
        scheduler.update(plan, result)
        scheduler.observe_step(plan, step_s)  # as the engine does; the model's own time: the factor stays 1
        steps.record(start_s, step_s, plan, scheduler)
    return SimResult(requests, steps, scheduler.num_preemptions, time.perf_counter() - started)


def _admit(scheduler: Scheduler, spec: TraceRequest, index: int) -> Request:
    token_ids = array("i", bytes(4 * spec.num_prompt_tokens))  # zeros: the sim never reads them
    params = SamplingParams(max_tokens=spec.num_output_tokens, ignore_eos=True)
    request = Request(f"r{index}", token_ids, params, (), spec.arrival_s, spec.priority, spec.deadline_s)
    scheduler.add_request(request, seed=0)
    return request
