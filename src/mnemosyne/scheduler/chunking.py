"""Chunking policies: how many new tokens each request may add to the step being built.

`fixed:N` caps a step at N tokens (the Sarathi baseline). `adaptive` gives each request, in the
scheduler's order, the largest chunk whose predicted step time still fits the TBT budget: chunks
start large and shrink as the prefix (and so the attention per token) grows. Without a budget, under
sequence pipelining, it sizes chunks for the shortest trip of a long prompt through the pipeline as
the step-time model sees it (`PipelineBudget`, in powers of two); otherwise the token cap. (`pipeline`
names the same policy.) On four H200s a 1M-token prompt at pp=4 took 132.4-136.4 s with the taper
against 142.6 s in 16K chunks at the cap (call41-43). Its 64K check matches tp=pp=kvp=1 on 16 of 16
greedy tokens with one near-tie that the other chunking orders the other way (call46: at token 5 the
reference's top two are 0.0077 apart in logprob, the taper's the same two swapped, 0.0097 apart); see
benchmarks/RESULTS.md. On a device, the budget is corrected by how long the steps it sized really took
(`feedback.StepTimeFeedback`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mnemosyne.config import PIPELINE_MIN_CHUNK, taper_chunk, tapers_long_prompts
from mnemosyne.scheduler.feedback import NEAR_BUDGET, QUANTILE, StepTimeFeedback
from mnemosyne.scheduler.latency_model import LatencyModel, StepEstimate

GRANULARITY = 32
"""Adaptive chunk sizes are multiples of this (or a request's whole remainder)."""
LONG_PROMPT_BUDGETS = 8
"""A prompt whose prefill left is predicted at more than this many step budgets is long (--live-yield)."""


class StepBudget(Protocol):
    """The room left in one step; filled request by request in the scheduler's order."""

    @property
    def is_full(self) -> bool:
        """No request can get a token any more."""
        ...

    def fit(self, num_prefix: int, max_new: int, yield_share: float) -> int:
        """Most new tokens, at most max_new, that a request with num_prefix tokens of KV may add
        now; 0 for none. `yield_share` of the budget still left is kept for requests behind it.
        Pure: `add` records the choice."""
        ...

    def add(self, num_new: int, num_prefix: int) -> None:
        """Record a request's chunk in the step."""
        ...


class Chunking(Protocol):
    def new_step(self) -> StepBudget:
        """A fresh, empty budget; called once at the start of each `schedule()`."""
        ...

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """A finished step that held a prefill chunk: its predicted and measured time."""
        ...


class TokenBudget:
    """At most num_tokens new tokens per step, first come first served in the scheduler's order."""

    def __init__(self, num_tokens: int, estimate: StepEstimate | None = None):
        self.num_tokens_left = num_tokens
        self.estimate = estimate
        """Predicted time of the step so far, when a latency model is known (for the simulator)."""

    @property
    def is_full(self) -> bool:
        return self.num_tokens_left == 0

    def fit(self, num_prefix: int, max_new: int, yield_share: float) -> int:
        return min(max_new, self.num_tokens_left)

    def add(self, num_new: int, num_prefix: int) -> None:
        self.num_tokens_left -= num_new
        if self.estimate is not None:
            self.estimate.add(num_new, num_prefix)


def _largest_fit(est: StepEstimate, num_prefix: int, cap: int, limit_s: float, least: int) -> int:
    """The largest chunk of k × GRANULARITY tokens, least <= k and k × GRANULARITY < cap, that the step
    (est, plus the chunk over num_prefix tokens) is predicted to fit within limit_s; least ×
    GRANULARITY tokens when none does. Binary search: a chunk's time only grows with its size."""
    lo, hi = least, (cap - 1) // GRANULARITY
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est.time_with_s(mid * GRANULARITY, num_prefix) <= limit_s:
            lo = mid
        else:
            hi = mid - 1
    return lo * GRANULARITY


class TimeBudget(TokenBudget):
    """A token cap plus a time budget: each chunk is the largest multiple of GRANULARITY (or the whole
    remainder) whose predicted step time fits. A one-token chunk is never refused, since leaving it
    out cannot help its request's TBT; and when the step is already over budget, or a minimal chunk
    could not fit even alone, the step's first multi-token chunk still gets GRANULARITY tokens so that
    an infeasible SLO slows prefills down instead of starving them.

    A long prompt's chunk in a step that already holds other requests' work yields `live_yield` of the
    budget left (at least), whether or not shorter work waits: the step ends sooner, and so does the
    wait of a request that arrives while it runs."""

    def __init__(self, num_tokens: int, estimate: StepEstimate, budget_s: float, live_yield: float = 0.0):
        super().__init__(num_tokens, estimate)
        self._est = estimate
        self.budget_s = budget_s
        self.live_yield = live_yield
        self._has_multi_token_chunk = False

    def fit(self, num_prefix: int, max_new: int, yield_share: float) -> int:
        cap = min(max_new, self.num_tokens_left)
        est = self._est
        if cap <= 1:
            return cap
        if self.live_yield > yield_share and est.num_seqs and self._is_long(num_prefix, max_new):
            yield_share = self.live_yield
        limit_s = self.budget_s - yield_share * max(0.0, self.budget_s - est.time_s)
        if est.time_with_s(cap, num_prefix) <= limit_s:
            return cap
        size = _largest_fit(est, num_prefix, cap, limit_s, least=0)
        if size == 0 and not self._has_multi_token_chunk and self._is_infeasible(num_prefix, cap):
            return min(GRANULARITY, cap)
        return size

    def _is_long(self, num_prefix: int, max_new: int) -> bool:
        return self._est.model.prefill_work_s(num_prefix, num_prefix + max_new) > LONG_PROMPT_BUDGETS * self.budget_s

    def _is_infeasible(self, num_prefix: int, cap: int) -> bool:
        alone = self._est.model.estimate()
        return (self._est.time_s > self.budget_s
                or alone.time_with_s(min(GRANULARITY, cap), num_prefix) > self.budget_s)

    def add(self, num_new: int, num_prefix: int) -> None:
        super().add(num_new, num_prefix)
        self._has_multi_token_chunk |= num_new > 1


class PipelineBudget(TokenBudget):
    """Chunks for a long prompt through pp stages under sequence pipelining, with no TBT budget.

    Chunk i takes about t_i on every stage, so the prefill is a proportionate flow shop, done after
    sum(t_i) + (pp - 1) max(t_i). Chunks at the token cap make the drain term long: the last chunks
    attend over the longest prefix (at 1M tokens, pp=4 and 16K-token chunks, 3 × 3.7 s). Small chunks
    pay each step's fixed cost h instead. For W of stage work, equal chunks of stage time
    t = h + sqrt(W h / (pp - 1)) minimise W t / (t - h) + (pp - 1) t, so each chunk is cut to the t of
    its whole prompt: chunks shrink as the prefix grows, at an even stage time."""

    def __init__(self, num_tokens: int, estimate: StepEstimate, num_stages: int, step_overhead_s: float):
        super().__init__(num_tokens, estimate)
        self._est = estimate
        self.num_stages = num_stages
        self.step_overhead_s = step_overhead_s
        """h: a minimal chunk's time on one stage, plus what stage 0 waits for each plan."""

    def stage_target_s(self, num_prompt_tokens: int) -> float:
        """t for a prompt of this many tokens."""
        pp, h = self.num_stages, self.step_overhead_s
        work_s = self._est.model.prefill_work_s(0, num_prompt_tokens) / pp
        return h + math.sqrt(work_s * h / (pp - 1))

    def fit(self, num_prefix: int, max_new: int, yield_share: float) -> int:
        """A power of two from PIPELINE_MIN_CHUNK up (or a remainder under it): few chunk lengths, whose
        cuDNN plans the worker builds at start-up. Built per chunk, mid-prefill, they were the most
        of what this policy lost (call35: 309 chunks of 128 lengths, 152.6 s against 140.3 s)."""
        cap = min(max_new, self.num_tokens_left)
        if cap <= PIPELINE_MIN_CHUNK:
            return cap
        limit_s = self.num_stages * self.stage_target_s(num_prefix + max_new)  # the whole step, every stage
        est = self._est
        size = cap if est.time_with_s(cap, num_prefix) <= limit_s else _largest_fit(est, num_prefix, cap, limit_s,
                                                                                     least=1)
        return taper_chunk(size)


class FixedChunking:
    """`fixed:N`: N tokens per step, whatever their predicted time."""

    def __init__(self, num_tokens: int, model: LatencyModel | None = None):
        self.num_tokens = num_tokens
        self.model = model

    def new_step(self) -> TokenBudget:
        return TokenBudget(self.num_tokens, self.model.estimate() if self.model else None)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """Fixed chunks ignore time."""


class AdaptiveChunking:
    """`adaptive`: chunks sized by predicted step time against `budget_s`, never over max_num_tokens;
    the budget is divided by `feedback.factor`, how much longer than predicted recent steps ran.
    Without a budget (no --tbt-slo-ms), the token cap alone, or under sequence pipelining over
    spp_stages > 1 stages, the chunks that take a long prompt through the pipeline soonest."""

    def __init__(self, model: LatencyModel, budget_s: float | None, max_num_tokens: int, spp_stages: int = 1,
                 dispatch_s: float = 0.0, slo_quantile: float = QUANTILE, live_yield: float = 0.0):
        self.model = model
        self.budget_s = budget_s
        self.live_yield = live_yield
        self.max_num_tokens = max_num_tokens
        self.spp_stages = spp_stages
        # h of PipelineBudget: a minimal chunk on one stage, plus the host time stage 0 waits for each
        # plan beyond what the model's step times hold (dispatch_s, the planner's); fixed by the model.
        self._tapers = tapers_long_prompts(spp_stages, budget_s is not None)
        self._stage_overhead_s = (model.step_time_s([(GRANULARITY, 0)]) / spp_stages + dispatch_s
                                  if self._tapers else 0.0)
        profile = getattr(model.costs, "profile", None)
        self.feedback = StepTimeFeedback(quantile=slo_quantile,
                                         prior=profile.check_ratios if profile is not None else ())

    def new_step(self) -> TokenBudget:
        if self.budget_s is not None:
            return TimeBudget(self.max_num_tokens, self.model.estimate(), self.budget_s / self.feedback.factor,
                              self.live_yield)
        if self._tapers:
            return PipelineBudget(self.max_num_tokens, self.model.estimate(), self.spp_stages,
                                  self._stage_overhead_s)
        return TokenBudget(self.max_num_tokens, self.model.estimate())

    def observe(self, predicted_s: float, measured_s: float) -> None:
        # near the budget the steps are sized to now: against the raw budget, a factor of 2 or more
        # would leave no step to observe, and the factor could never come down again (call29 and
        # call30 froze at 4, and a long prompt got no chunk for minutes)
        if self.budget_s is not None and predicted_s >= NEAR_BUDGET * self.budget_s / self.feedback.factor:
            self.feedback.observe(predicted_s, measured_s, NEAR_BUDGET * self.budget_s)


@dataclass(frozen=True)
class ChunkingArgs:
    """What a chunking policy is built from."""

    num_tokens: int
    """N of `name:N`, or 0."""
    model: LatencyModel
    budget_s: float | None
    """TBT budget (--tbt-slo-ms) in seconds, or None."""
    max_num_tokens: int
    """The token cap (--max-num-batched-tokens)."""
    spp_stages: int = 1
    """Pipeline stages under sequence pipelining, else 1."""
    dispatch_s: float = 0.0
    """Stage 0's wait for each plan beyond the model's step times."""
    slo_quantile: float = QUANTILE
    """Share of budget-limited steps meant to fit the budget (--tbt-slo-quantile)."""
    live_yield: float = 0.0
    """Share of the budget left that a long prompt's chunk leaves unused beside other work (--live-yield)."""


ChunkingFactory = Callable[[ChunkingArgs], Chunking]

_CHUNKINGS: dict[str, ChunkingFactory] = {}


def register_chunking(name: str) -> Callable[[ChunkingFactory], ChunkingFactory]:
    def register(factory: ChunkingFactory) -> ChunkingFactory:
        _CHUNKINGS[name] = factory
        return factory

    return register


@register_chunking("fixed")
def _fixed(a: ChunkingArgs) -> Chunking:
    return FixedChunking(a.num_tokens, a.model)


@register_chunking("adaptive")
@register_chunking("pipeline")
def _adaptive(a: ChunkingArgs) -> Chunking:
    return AdaptiveChunking(a.model, a.budget_s, a.max_num_tokens, a.spp_stages, a.dispatch_s, a.slo_quantile,
                            a.live_yield)


def parse_chunking(spec: str) -> tuple[str, int]:
    """(name, N) of `adaptive`, `pipeline` or `fixed:N`; raises ValueError naming --chunking."""
    name, _, arg = spec.partition(":")
    needs_n = name == "fixed"
    if name not in _CHUNKINGS or needs_n != bool(arg) or (needs_n and (not arg.isdigit() or int(arg) <= 0)):
        raise ValueError(f"--chunking must be adaptive, pipeline or fixed:N with N a positive token count, "
                         f"got {spec!r}")
    return name, int(arg or 0)


def make_chunking(spec: str, model: LatencyModel, budget_s: float | None, max_num_tokens: int,
                  spp_stages: int = 1, dispatch_s: float = 0.0, slo_quantile: float = QUANTILE,
                  live_yield: float = 0.0) -> Chunking:
    """The policy `spec` names (`ChunkingArgs` says what the rest mean)."""
    name, num_tokens = parse_chunking(spec)
    return _CHUNKINGS[name](ChunkingArgs(num_tokens, model, budget_s, max_num_tokens, spp_stages, dispatch_s,
                                         slo_quantile, live_yield))
