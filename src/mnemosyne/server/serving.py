"""OpenAI completions and chat completions over AsyncEngine: prompts, limits, admission, aborts.

One OpenAI choice is one engine request; all choices of an HTTP request share one event queue.
The response bodies (JSON and SSE chunks) are built in `server/responses.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from mnemosyne.engine.async_engine import AsyncEngine, EngineDeadError, Event
from mnemosyne.engine.core_wire import Delta, Progress
from mnemosyne.metrics.prometheus import ServerMetrics
from mnemosyne.request import SamplingParams
from mnemosyne.server.launch import ServerConfig
from mnemosyne.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from mnemosyne.server.responses import Choice, ResponseBuilder

logger = logging.getLogger(__name__)

KEEPALIVE_S = 2.0
"""A stream silent this long gets an SSE comment (prefill progress if known), so proxies keep it open."""
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat defaults to whatever room the context leaves."""
MAX_CHOICES = 256
"""Most engine requests one HTTP request may create (prompts times n)."""


class OpenAIServing:
    """Turns validated OpenAI requests into engine requests and their events into responses."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_name: str, config: ServerConfig,
                 metrics: ServerMetrics):
        assert engine.info is not None, "start the engine before serving"
        self.engine = engine
        self.info = engine.info
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = config
        self.metrics = metrics
        # Encoding and chat templates run off the event loop, on one thread so that they never race each
        # other; single-token decodes for logprobs are cheap and read-only, so they stay on the loop.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="mnemosyne-tokenizer")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # -- endpoints ---------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, http: Request) -> Response:
        arrival_s = time.monotonic()
        self._check_model(body.model)
        body.check_unsupported()
        self._admit_count(_num_prompts(body.prompt) * body.n)
        prompts = await self._completion_prompts(body.prompt)
        max_tokens = [self._max_tokens(body.max_tokens, len(p), COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
                      for p in prompts]
        builder = ResponseBuilder("text_completion", f"cmpl-{uuid.uuid4().hex}", self.model_name, self._token_text,
                                  with_logprobs=body.logprobs is not None)
        return await self._generate(body, prompts, max_tokens, body.logprobs, builder, arrival_s, http)

    async def chat(self, body: ChatCompletionRequest, http: Request) -> Response:
        arrival_s = time.monotonic()
        self._check_model(body.model)
        body.check_unsupported()
        self._admit_count(body.n)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in body.messages]
        prompt = await self._run_tokenizer(self._encode_chat, messages)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = [self._max_tokens(requested, len(prompt), None, "messages")]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        builder = ResponseBuilder("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", self.model_name,
                                  self._token_text, with_logprobs=body.logprobs)
        return await self._generate(body, [prompt], max_tokens, logprobs, builder, arrival_s, http)

    # -- checks ------------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _admit_count(self, num_new: int) -> None:
        if num_new > MAX_CHOICES:
            raise APIError(400, f"this request asks for {num_new} completions (prompts times n); "
                                f"the limit is {MAX_CHOICES}", param="n")
        num_queued = self.engine.num_queued_requests
        if num_queued + num_new > self.config.max_waiting_requests:
            self._reject("max_waiting_requests",
                         f"the server has {num_queued} requests waiting for their first token and admits at "
                         f"most {self.config.max_waiting_requests} (--max-waiting-requests); retry later")

    def _admit_tokens(self, num_new_tokens: int) -> None:
        num_queued = self.engine.num_queued_prompt_tokens
        # An empty queue always admits, so that one prompt above the limit can still run on its own.
        if num_queued and num_queued + num_new_tokens > self.config.max_queued_prompt_tokens:
            self._reject("max_queued_prompt_tokens",
                         f"the server has {num_queued} prompt tokens queued for prefill and admits at most "
                         f"{self.config.max_queued_prompt_tokens} (--max-queued-prompt-tokens); retry later")

    def _reject(self, limit: str, message: str) -> None:
        self.metrics.requests_rejected.labels(limit).inc()
        raise APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(self._retry_after_s())})

    def _retry_after_s(self) -> int:
        """Time to prefill what is queued, at the rate of the latest step; at least 1 s, at most 60."""
        stats = self.engine.stats
        if stats is None or not stats.step_s or not stats.num_step_tokens:
            return 1
        rate = stats.num_step_tokens / stats.step_s
        return min(60, max(1, math.ceil(self.engine.num_queued_prompt_tokens / rate)))

    def _max_tokens(self, requested: int | None, num_prompt: int, default: int | None, prompt_param: str) -> int:
        limit = self.info.max_request_tokens
        why = "" if limit == self.info.max_model_len else \
            f" (the KV cache holds fewer tokens than max_model_len {self.info.max_model_len})"
        if num_prompt >= limit:
            raise APIError(400, f"the prompt has {num_prompt} tokens, but this model's context holds at most "
                                f"{limit} tokens, prompt plus output{why}", param=prompt_param,
                           code="context_length_exceeded")
        room = limit - num_prompt
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {limit} tokens{why}, but you requested "
                                f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for "
                                f"the completion); reduce the prompt or max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        return requested

    # -- prompts -----------------------------------------------------------------------------------
    async def _run_tokenizer(self, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, fn, *args)

    async def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        # The body's validation left one of str, list[int], list[list[int]], list[str]: the first
        # element tells the lists apart.
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        ids = [p if isinstance(p, list) else await self._run_tokenizer(self._encode, p) for p in prompts]
        for tokens in ids:
            check_token_ids(tokens, self.info.vocab_size)
        return ids

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, f"the model {self.model_name} has no tokenizer; send the prompt as token ids",
                           param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"the model {self.model_name} has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own types; any of them is the messages' fault
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    # -- generation --------------------------------------------------------------------------------
    async def _generate(self, body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                        max_tokens: list[int], logprobs: int | None, builder: ResponseBuilder,
                        arrival_s: float, http: Request) -> Response:
        self._admit_count(len(prompts) * body.n)  # again: others may have arrived while we tokenized
        self._admit_tokens(sum(len(p) for p in prompts) * body.n)
        choices = [Choice(p * body.n + i, f"{builder.response_id}-{p * body.n + i}", p, len(prompt))
                   for p, prompt in enumerate(prompts) for i in range(body.n)]
        queue: asyncio.Queue[Event] = asyncio.Queue()
        params = [self._sampling_params(body, max_tokens[c.index // body.n], logprobs, c.index % body.n)
                  for c in choices]
        await self._submit(choices, prompts, params, queue, arrival_s, body.n, body.priority or 0, body.deadline)
        if self.config.log_requests:
            logger.info("request %s: %d choices, prompt tokens %s, max_tokens %s", builder.response_id,
                        len(choices), [len(p) for p in prompts], max_tokens)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # The background task covers a client gone before the generator first ran (so its finally
            # never runs): the response always ends by aborting whatever did not finish.
            return StreamingResponse(self._stream(choices, queue, builder, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self._abort_unfinished, choices))
        return await self._collect(choices, queue, builder, http)

    def _sampling_params(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                         logprobs: int | None, choice: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
                seed=None if body.seed is None else body.seed + choice, stop=body.stop or None,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _submit(self, choices: list[Choice], prompts: list[list[int]], params: list[SamplingParams],
                      queue: asyncio.Queue[Event], arrival_s: float, n: int, priority: int,
                      deadline_s: float | None) -> None:
        # Registration is synchronous, right after the admission checks, so that concurrent requests
        # can never all pass the checks before any of them counts as queued.
        acks = [self.engine.add_request(c.request_id, prompts[c.index // n], p, queue, arrival_s,
                                        priority, deadline_s)
                for c, p in zip(choices, params, strict=True)]
        try:
            results = await asyncio.gather(*acks, return_exceptions=True)
        except BaseException:
            self.engine.abort([c.request_id for c in choices])
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        self.engine.abort([c.request_id for c in choices])
        if isinstance(errors[0], ValueError):
            raise APIError(400, str(errors[0]), param="prompt")
        if isinstance(errors[0], EngineDeadError):
            raise APIError(503, f"the engine is unavailable: {errors[0]}", type="server_error",
                           code="engine_unavailable")
        raise errors[0]

    async def _abort_unfinished(self, choices: list[Choice]) -> None:
        self.engine.abort([c.request_id for c in choices if c.finish_reason is None])

    async def _collect(self, choices: list[Choice], queue: asyncio.Queue[Event], builder: ResponseBuilder,
                       http: Request) -> Response:
        by_id = {c.request_id: c for c in choices}
        watcher = asyncio.create_task(_abort_on_disconnect(http, self.engine, choices, queue))
        try:
            num_pending = len(choices)
            while num_pending:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise _engine_error(event)
                if isinstance(event, Delta):
                    by_id[event.request_id].add(event)
                    num_pending -= event.finish_reason is not None
            return JSONResponse(builder.full(choices))
        finally:
            watcher.cancel()
            await self._abort_unfinished(choices)

    async def _stream(self, choices: list[Choice], queue: asyncio.Queue[Event], builder: ResponseBuilder,
                      include_usage: bool) -> AsyncIterator[str]:
        """SSE events until every choice finished; aborts what is left if the client goes away."""
        by_id = {c.request_id: c for c in choices}
        getter: asyncio.Future[Event] | None = None
        try:
            for chunk in builder.opening_chunks(choices, include_usage):
                yield _sse(chunk)
            num_pending = len(choices)
            while num_pending:
                # A persistent get(): cancelling a get on timeout could drop an event on Python 3.11.
                getter = getter or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=KEEPALIVE_S)
                if not done:
                    yield _keepalive(choices)
                    continue
                event, getter = getter.result(), None
                if isinstance(event, BaseException):
                    yield _sse(_engine_error(event).body())
                    return
                choice = by_id[event.request_id]
                if isinstance(event, Progress):
                    choice.num_computed_tokens = event.num_computed_tokens
                    yield f": prefill {event.num_computed_tokens}/{event.num_prompt_tokens}\n\n"
                    continue
                choice.add(event)
                num_pending -= event.finish_reason is not None
                chunk = builder.delta_chunk(choice, event, include_usage)
                if chunk is not None:
                    yield _sse(chunk)
            if include_usage:
                yield _sse(builder.usage_chunk(choices))
            yield "data: [DONE]\n\n"
        finally:
            if getter is not None:
                getter.cancel()
            await self._abort_unfinished(choices)


def check_token_ids(tokens: list[int], vocab_size: int) -> None:
    """A prompt's ids are a non-empty list in [0, vocab_size); raises APIError(400) otherwise. min and
    max run in C: a million ids take milliseconds, on the event loop every stream shares."""
    if not tokens:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")


async def _abort_on_disconnect(http: Request, engine: AsyncEngine, choices: Sequence[Choice],
                               queue: asyncio.Queue[Event]) -> None:
    """Wait for the client to hang up (the body is already read), then abort its requests."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    engine.abort([c.request_id for c in choices if c.finish_reason is None])
    queue.put_nowait(ConnectionAbortedError("the client disconnected"))


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, EngineDeadError):
        return APIError(503, f"the engine is unavailable: {error}", type="server_error", code="engine_unavailable")
    if isinstance(error, ConnectionAbortedError):
        return APIError(499, str(error), code="client_closed_request")
    return APIError(500, f"internal error: {type(error).__name__}", type="server_error")


def _keepalive(choices: Sequence[Choice]) -> str:
    starting = next((c for c in choices if not c.token_ids and c.finish_reason is None), None)
    if starting is None:
        return ": keepalive\n\n"
    return f": prefill {starting.num_computed_tokens}/{starting.num_prompt_tokens}\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {ResponseBuilder.dumps(payload)}\n\n"


def _num_prompts(prompt: str | list) -> int:
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _content_text(content: str | list | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"message content of type {part.type!r} is not supported; only text",
                           param="messages")
        parts.append(part.text)
    return "\n".join(parts)

