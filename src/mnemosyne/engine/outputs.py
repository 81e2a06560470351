"""What the engine hands back to callers, per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mnemosyne.plan import TokenLogprobs
from mnemosyne.request import RequestMetrics


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop', 'length' or 'abort' once finished."""
    logprobs: list[TokenLogprobs] | None = None
    new_text: str = ""
    """Text released since the previous output of this request (for streaming)."""
    new_token_ids: list[int] = field(default_factory=list)
    """Tokens produced since the previous output of this request."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: Sequence[int]
    """array('i')."""
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_computed_tokens: int = 0
    """Prompt progress, for prefill progress reports."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV was reused from the prefix cache instead of computed."""
