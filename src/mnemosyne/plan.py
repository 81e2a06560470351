"""Wire types between the engine core and the workers. Small, frozen and primitive: a prompt
crosses once, in `NewRequest`; afterwards each step carries only counts, new block ids and the
few token ids sampled since the last step, so its size never grows with the context."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from mnemosyne.request import SamplingParams

WARM_UP_REQUEST_ID = "warm-up"
"""The engine's start-up prompt (`LLMEngine._warm_up`): workers count its steps as start-up."""


@dataclass(frozen=True)
class NewRequest:
    """A request the workers have not seen (or must rebuild after a preemption)."""

    request_id: str
    token_ids: array
    """array('i'): every token known so far (the prompt, plus outputs after a preemption)."""
    params: SamplingParams
    seed: int
    """Seed of the request's sampling generator."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_new_tokens) of one request in this step."""

    request_id: str
    start: int
    """Tokens before this chunk that already have (or are getting) KV."""
    num_new_tokens: int
    new_block_ids: tuple[int, ...]
    """Blocks appended to the request's block table this step."""
    new_token_ids: tuple[int, ...]
    """Token ids sampled since the workers last heard of this request."""


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    new_requests: tuple[NewRequest, ...]
    chunks: tuple[ScheduledChunk, ...]
    """In batch order."""
    freed_ids: tuple[str, ...]
    """Finished, aborted or preempted requests whose worker state must be dropped first."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    """Log probability of the sampled token."""
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class StepResult:
    """Tokens sampled by requests whose chunk reached their last known token."""

    step_id: int
    request_ids: tuple[str, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...]


@dataclass(frozen=True)
class StageDone:
    """One pipeline stage finished one step's micro-batch, as its tp rank 0 measured it. Stage 0's
    tells the engine that the step's requests may send their next chunks (sequence pipelining);
    with --trace-file every stage reports, for the trace."""

    step_id: int
    kvp_rank: int
    pp_rank: int
    start_s: float
    """time.time() when the stage had the micro-batch's inputs (the previous stage's activations)."""
    end_s: float
    """time.time() when its output had left: sent to the next stage, or sampled on the last. On a GPU
    without a trace, stage 0 reports once its kernels are queued (see `StageClock`)."""


StepEvent = StageDone | StepResult
"""What an executor reports about a step in flight."""
