"""OpenAI response bodies: whole completions, SSE chunks, usage and logprobs, for both endpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnemosyne.engine.core_wire import Delta, Logprob


@dataclass
class Choice:
    """One OpenAI choice, served by one engine request; accumulates its deltas."""

    index: int
    request_id: str
    prompt_index: int
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    """Prefill progress, from the core's reports."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache, from the core's deltas."""
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_offset_chars: int = 0
    """Characters of token strings already given text offsets (completions logprobs)."""

    def add(self, delta: Delta) -> None:
        self.text_parts.append(delta.new_text)
        self.token_ids.extend(delta.new_token_ids)
        self.logprobs.extend(delta.new_logprobs or ())
        self.finish_reason = delta.finish_reason
        self.num_cached_tokens = delta.num_cached_tokens

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class ResponseBuilder:
    """Builds one HTTP request's response bodies; `kind` is 'text_completion' or 'chat.completion'."""

    def __init__(self, kind: str, response_id: str, model: str, token_text: Callable[[int], str],
                 with_logprobs: bool):
        self.kind = kind
        self.response_id = response_id
        self.model = model
        self.token_text = token_text
        self.with_logprobs = with_logprobs
        self.created = int(time.time())

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat.completion"

    @staticmethod
    def dumps(payload: dict[str, Any]) -> str:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))

    def full(self, choices: Sequence[Choice]) -> dict[str, Any]:
        """The non-streaming response."""
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            logprobs = self._logprobs(c, c.token_ids, c.logprobs) if self.with_logprobs else None
            if self.is_chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                out.append({"index": c.index, "text": c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {"id": self.response_id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": out, "usage": usage(choices)}

    def opening_chunks(self, choices: Sequence[Choice], include_usage: bool) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role for each choice; completions open with nothing."""
        if not self.is_chat:
            return []
        return [self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}, include_usage) for c in choices]

    def delta_chunk(self, choice: Choice, delta: Delta, include_usage: bool) -> dict[str, Any] | None:
        """The SSE chunk for one delta, or None when it carries nothing. A delta whose text is held back
        (a possible stop string, an incomplete UTF-8 sequence) still gets a chunk, so that clients can
        count tokens as they arrive."""
        if not delta.new_token_ids and not delta.new_text and delta.finish_reason is None:
            return None
        has_logprobs = self.with_logprobs and bool(delta.new_token_ids)
        logprobs = self._logprobs(choice, delta.new_token_ids, delta.new_logprobs or []) if has_logprobs else None
        if self.is_chat:
            body = {"index": choice.index, "delta": {"content": delta.new_text} if delta.new_text else {},
                    "logprobs": logprobs, "finish_reason": delta.finish_reason}
        else:
            body = {"index": choice.index, "text": delta.new_text, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason}
        return self._chunk(body, include_usage)

    def usage_chunk(self, choices: Sequence[Choice]) -> dict[str, Any]:
        return {"id": self.response_id, "object": self._chunk_kind, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(choices)}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.is_chat else "text_completion"

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        chunk = {"id": self.response_id, "object": self._chunk_kind, "created": self.created, "model": self.model,
                 "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, choice: Choice, token_ids: Sequence[int], logprobs: Sequence[Logprob]) -> dict[str, Any]:
        tokens = [self.token_text(t) for t in token_ids]
        if self.is_chat:
            return {"content": [{**_chat_token(s, lp.logprob),
                                 "top_logprobs": [_chat_token(self.token_text(t), v)
                                                  for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)]}
                                for s, lp in zip(tokens, logprobs, strict=True)],
                    "refusal": None}
        offsets = []
        for s in tokens:
            offsets.append(choice.num_offset_chars)
            choice.num_offset_chars += len(s)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.token_text(t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)}
                                 for lp in logprobs],
                "text_offset": offsets}


def usage(choices: Sequence[Choice]) -> dict[str, Any]:
    """Prompt tokens count once per prompt, however many choices share it; so do cached ones (OpenAI's
    `prompt_tokens_details.cached_tokens`: those of the prompt's first choice)."""
    first = {}
    for c in sorted(choices, key=lambda c: c.index):
        first.setdefault(c.prompt_index, c)
    prompt = sum(c.num_prompt_tokens for c in first.values())
    cached = sum(c.num_cached_tokens for c in first.values())
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
