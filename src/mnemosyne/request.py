"""Per-request state owned by the engine core: token ids, progress counters, timestamps.

Prefill, decode and chunk are not states: they are read off `num_computed_tokens` against
`num_tokens`. Token ids live in a compact `array('i')`, never a list of Python ints, so a
10M-token request costs 40 MB of host memory.
"""

from __future__ import annotations

import enum
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop."""

    max_tokens: int = 64
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Per-request seed; the same seed gives the same samples whatever else is batched."""
    stop: str | Sequence[str] | None = None
    """Strings that end generation; they are not part of the returned text."""
    stop_token_ids: Sequence[int] | None = None
    """Token ids that end generation, besides the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives per step."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic seconds) of one request."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    """Gaps between consecutive output tokens."""
    num_preemptions: int = 0

    def record_token(self, now_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = now_s
        else:
            self.inter_token_s.append(now_s - self.last_token_s)  # type: ignore[operator]
        self.last_token_s = now_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


class Request:
    """A prompt and its generated tokens, as the scheduler sees them.

    Invariant: tokens [0, num_computed_tokens) have KV in the cache;
    `num_computed_tokens + num_inflight_tokens <= num_tokens + 1`. The one extra is a decode scheduled
    ahead (async scheduling): its token is the sample of the step before it, still in flight.
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                 eos_token_ids: Sequence[int] = (), arrival_s: float | None = None,
                 priority: int = 0, deadline_s: float | None = None) -> None:
        self.request_id = request_id
        self.params = params
        self.priority = priority
        """Scheduling priority; lower is more urgent. Each step of it halves or doubles the deadline."""
        self.deadline_s = deadline_s
        """Seconds after arrival by which the first token is due; None: from --ttft-slo-ms and work."""
        self.token_ids = array("i", prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_inflight_tokens = 0
        """Tokens dispatched in a step whose result has not come back (SPP keeps several)."""
        self.num_stage0_tokens = 0
        """Of those, tokens whose micro-batch has not left pipeline stage 0 yet (the scheduler is told
        at the last stage instead when sequence pipelining is off). The next chunk waits for 0."""
        self.block_ids: list[int] = []
        self.num_synced_tokens = 0
        """Tokens whose ids the workers already hold (prompt sent once, then sampled ids)."""
        self.num_synced_blocks = 0
        """Blocks of block_ids the workers already hold."""
        self.block_hashes: list[bytes] = []
        """Chained hashes of the first full blocks of token_ids, computed as the prefix cache needs them
        (kv/block_hash.py); they stay valid across preemptions, since tokens are only appended."""
        self.num_cached_tokens = 0
        """Prompt tokens whose KV was reused from the prefix cache at the latest admission; while the
        request waits for its first one, those it is expected to reuse (for deadlines and work)."""
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.finish_reason: FinishReason | None = None
        self.metrics = RequestMetrics(arrival_s=time.monotonic() if arrival_s is None else arrival_s)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens not yet computed or dispatched."""
        return max(0, self.num_tokens - self.num_computed_tokens - self.num_inflight_tokens)

    def can_decode_ahead(self, max_model_len: int) -> bool:
        """Whether a decode of the token a step in flight is sampling may be scheduled now (async
        scheduling): that step reaches the last known token and has no decode behind it yet, and its
        sample cannot end the request by length. (A stop token may still end it: the step ahead is
        then wasted, never wrong.)"""
        return (self.num_inflight_tokens > 0
                and self.num_computed_tokens + self.num_inflight_tokens == self.num_tokens
                and self.num_output_tokens + 1 < self.params.max_tokens
                and self.num_tokens + 1 < max_model_len)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Finish reason implied by the last appended token, or None to go on."""
        if self.num_output_tokens and self.token_ids[-1] in self.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"inflight={self.num_inflight_tokens}, blocks={len(self.block_ids)})")
