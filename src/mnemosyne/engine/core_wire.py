"""Messages between the API process and the engine-core process: msgpack structs over ZeroMQ.

A prompt crosses once, as packed int32 token ids; everything after is a delta (new text, new
token ids, prefill progress, one stats record per step), so traffic never grows with the context.
"""

from __future__ import annotations

from array import array

import msgspec

from mnemosyne.request import SamplingParams


class _Wire(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


# -- API process -> core --------------------------------------------------------------------------
class AddRequest(_Wire):
    request_id: str
    token_ids: bytes
    """array('i') bytes: the whole prompt, tokenized by the API process."""
    params: SamplingParams
    arrival_s: float
    """time.monotonic() in the API process when the HTTP request arrived (same clock host-wide)."""
    priority: int = 0
    """Lower is more urgent; scales the TTFT deadline by 2 ** priority."""
    deadline_s: float | None = None
    """First token due this long after arrival; None: from --ttft-slo-ms and predicted work."""


class AbortRequests(_Wire):
    request_ids: list[str]


class Shutdown(_Wire):
    pass


# -- core -> API process --------------------------------------------------------------------------
class Ready(_Wire):
    """Sent once the model is loaded; the API process binds its port only after this."""

    model_name: str
    max_model_len: int
    """Longest prompt plus output the engine accepts."""
    max_request_tokens: int
    """Most tokens (prompt plus output) one request can ever hold: max_model_len, or less when the KV
    cache (all KVP groups together) holds less."""
    vocab_size: int
    num_kv_blocks: int
    block_size: int


class Added(_Wire):
    """The core queued the request."""

    request_id: str


class Rejected(_Wire):
    """The core refused the request (it can never run); `message` says why, for a 400."""

    request_id: str
    message: str


class Logprob(_Wire):
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class Delta(_Wire):
    """What one request produced in one step."""

    request_id: str
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob] | None
    """One per new token, when the request asked for logprobs."""
    finish_reason: str | None
    """'stop', 'length' or 'abort' on the request's last delta."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV the request reused from the prefix cache (at its latest admission)."""


class Progress(_Wire):
    """Prefill progress of a request that has not produced its first token yet."""

    request_id: str
    num_computed_tokens: int
    num_prompt_tokens: int


class Stats(_Wire):
    """Engine state after a step (or a heartbeat when idle: then the step fields are 0)."""

    num_running: int
    num_waiting: int
    num_waiting_preempted: int
    """Waiting requests that ran before and lost their KV to a preemption."""
    num_preemptions: int
    """Since the core started."""
    kv_usage: float
    """Fraction of KV blocks in use, in [0, 1]."""
    step_s: float
    num_step_tokens: int
    num_step_requests: int
    num_prefix_queried_tokens: int = 0
    """Since the core started: tokens of requests admitted with prefix caching on (readmissions too)."""
    num_prefix_hit_tokens: int = 0
    """Since the core started: of those, tokens whose KV was reused from the prefix cache."""
    num_prefix_evicted_blocks: int = 0
    """Since the core started: cached KV blocks evicted to make room."""


class StepReport(_Wire):
    deltas: list[Delta]
    progress: list[Progress]
    stats: Stats


class Fatal(_Wire):
    """The core hit an exception it cannot recover from and is exiting."""

    message: str


ToCore = AddRequest | AbortRequests | Shutdown
FromCore = Ready | Added | Rejected | StepReport | Fatal


def pack_token_ids(token_ids: list[int]) -> bytes:
    return array("i", token_ids).tobytes()


def unpack_token_ids(data: bytes) -> array:
    ids = array("i")
    ids.frombytes(data)
    return ids
