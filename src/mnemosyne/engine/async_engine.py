"""AsyncEngine: the API process's handle on the engine-core process.

It spawns the core, sends it token ids over ZeroMQ, and fans the core's deltas out to one asyncio
queue per request. It notices at once when the core dies and fails every live request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from mnemosyne.config import EngineConfig
from mnemosyne.engine.core_process import run_engine_core
from mnemosyne.engine.core_wire import (
    AbortRequests,
    Added,
    AddRequest,
    Delta,
    Fatal,
    FromCore,
    Progress,
    Ready,
    Rejected,
    Shutdown,
    Stats,
    StepReport,
    pack_token_ids,
)
from mnemosyne.metrics.prometheus import ServerMetrics
from mnemosyne.request import SamplingParams

logger = logging.getLogger(__name__)

Event = Delta | Progress | BaseException
"""What a request's queue receives: its deltas, its prefill progress, or the error that ended it."""

_EXIT_GRACE_S = 0.2
"""After the core exits, keep reading this long so a Fatal message it sent is not lost."""


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can complete."""


@dataclass
class _Live:
    """A request the core holds, as the API process tracks it."""

    queue: asyncio.Queue[Event]
    num_prompt_tokens: int
    arrival_s: float
    num_computed_tokens: int = 0
    last_token_s: float | None = None
    """None until the first token arrives: until then the request counts as queued for admission."""


class AsyncEngine:
    """Owns the engine-core process. Create with `await AsyncEngine.start(...)`; call `shutdown`."""

    def __init__(self, config: EngineConfig, progress_s: float, metrics: ServerMetrics | None = None,
                 log_level: int = logging.WARNING):
        self.config = config
        self.progress_s = progress_s
        self.metrics = metrics
        self.log_level = log_level
        self.info: Ready | None = None
        self.stats: Stats | None = None
        """The core's latest stats report."""
        self.dead_reason: str | None = None
        """Why the core died; None while it lives (or after a clean shutdown)."""
        self.dead_event = asyncio.Event()
        self._live: dict[str, _Live] = {}
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._fatal_message: str | None = None
        self._is_stopping = False
        self._ipc_dir = tempfile.mkdtemp(prefix="mnemosyne-")
        self._zmq = zmq.asyncio.Context()
        self._inbox = self._zmq.socket(zmq.PUSH)  # to the core
        self._inbox.bind(f"ipc://{self._ipc_dir}/in")
        self._outbox = self._zmq.socket(zmq.PULL)  # from the core
        self._outbox.bind(f"ipc://{self._ipc_dir}/out")
        self._encoder = msgspec.msgpack.Encoder()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Future[Ready] | None = None

    @classmethod
    async def start(cls, config: EngineConfig, progress_s: float = 1.0, metrics: ServerMetrics | None = None,
                    log_level: int = logging.WARNING) -> AsyncEngine:
        """Spawn the core and wait until its model is loaded; raises RuntimeError with the core's error."""
        engine = cls(config, progress_s, metrics, log_level)
        try:
            await engine._spawn()
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, name="mnemosyne-engine-core",
            args=(self.config, f"ipc://{self._ipc_dir}/in", f"ipc://{self._ipc_dir}/out", self.progress_s,
                  self.log_level))
        process.start()
        self._process = process
        logger.info("engine core started, pid %d", process.pid)
        self._reader = asyncio.create_task(self._read_outputs())
        loop.add_reader(process.sentinel, self._on_core_exit)
        self.info = await self._ready

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def is_alive(self) -> bool:
        return self.info is not None and self.dead_reason is None and not self._is_stopping

    # -- admission inputs --------------------------------------------------------------------------
    @property
    def num_queued_requests(self) -> int:
        """Requests sent to the core that have not produced a token yet."""
        return sum(1 for live in self._live.values() if live.last_token_s is None)

    @property
    def num_queued_prompt_tokens(self) -> int:
        """Prompt tokens sent to the core whose KV is not computed yet."""
        return sum(live.num_prompt_tokens - live.num_computed_tokens
                   for live in self._live.values() if live.last_token_s is None)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                    queue: asyncio.Queue[Event], arrival_s: float | None = None, priority: int = 0,
                    deadline_s: float | None = None) -> asyncio.Future[None]:
        """Send a request to the core now; it counts as queued at once. Its events then go to `queue`.
        `priority` (lower is more urgent) and `deadline_s` (first token due this long after arrival)
        steer the deadline-aware schedulers.

        The returned future resolves when the core accepted it, or raises ValueError (the core's message)
        if it can never run, or EngineDeadError if the core is gone.
        """
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.dead_reason is not None or self._is_stopping:
            ack.set_exception(EngineDeadError(self.dead_reason or "the engine is shutting down"))
            return ack
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        self._acks[request_id] = ack
        self._live[request_id] = _Live(queue, len(token_ids), arrival_s)
        self._send(AddRequest(request_id, pack_token_ids(token_ids), params, arrival_s, priority, deadline_s))
        return ack

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests (client gone, shutdown); the core frees their KV blocks at once. Unknown ids are
        ignored. No further events reach their queues."""
        live_ids = [r for r in request_ids if r in self._live]
        for request_id in live_ids:
            self._finish(request_id, "abort")
        if live_ids and self.dead_reason is None and self._process is not None:
            self._send(AbortRequests(live_ids))

    def abort_all(self, error: BaseException) -> None:
        """End every live request with `error` in its queue (shutdown after the drain timeout)."""
        for live in self._live.values():
            live.queue.put_nowait(error)
        self.abort(list(self._live))

    def _send(self, message: AddRequest | AbortRequests | Shutdown) -> None:
        # PUSH to a connected peer queues in ZMQ's I/O thread; this never blocks the event loop.
        self._inbox.send(self._encoder.encode(message), copy=False)

    # -- the core's outputs ------------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        decoder = msgspec.msgpack.Decoder(FromCore)
        while True:
            raw = await self._outbox.recv()
            try:
                self._dispatch(decoder.decode(raw))
            except Exception:  # one bad message must not silence every later one
                logger.exception("could not handle a message from the engine core")

    def _dispatch(self, message: FromCore) -> None:
        if isinstance(message, StepReport):
            now_s = time.monotonic()
            for delta in message.deltas:
                self._on_delta(delta, now_s)
            for progress in message.progress:
                live = self._live.get(progress.request_id)
                if live is not None:
                    live.num_computed_tokens = progress.num_computed_tokens
                    live.queue.put_nowait(progress)
            self.stats = message.stats
            if self.metrics is not None:
                self.metrics.observe_stats(message.stats)
        elif isinstance(message, Added):
            ack = self._acks.pop(message.request_id, None)
            live = self._live.get(message.request_id)
            if live is not None and self.metrics is not None:
                self.metrics.prompt_tokens.inc(live.num_prompt_tokens)
            if ack is not None and not ack.done():
                ack.set_result(None)
        elif isinstance(message, Rejected):
            ack = self._acks.pop(message.request_id, None)
            self._live.pop(message.request_id, None)  # never started: no finish to count
            if ack is not None and not ack.done():
                ack.set_exception(ValueError(message.message))
        elif isinstance(message, Ready):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif isinstance(message, Fatal):
            logger.error("engine core failed: %s", message.message)
            self._fatal_message = message.message

    def _on_delta(self, delta: Delta, now_s: float) -> None:
        live = self._live.get(delta.request_id)
        if live is None:
            return  # aborted while its step ran
        num_new = len(delta.new_token_ids)
        if num_new and self.metrics is not None:
            if live.last_token_s is None:
                self.metrics.ttft_s.observe(now_s - live.arrival_s)
            else:
                self.metrics.tbt_s.observe(now_s - live.last_token_s)
            for _ in range(num_new - 1):
                self.metrics.tbt_s.observe(0.0)  # tokens that arrive together are 0 s apart
            self.metrics.generation_tokens.inc(num_new)
        if num_new:
            live.last_token_s = now_s
            live.num_computed_tokens = live.num_prompt_tokens
        live.queue.put_nowait(delta)
        if delta.finish_reason is not None:
            self._finish(delta.request_id, delta.finish_reason)

    def _finish(self, request_id: str, reason: str) -> None:
        live = self._live.pop(request_id)
        if self.metrics is not None:
            self.metrics.observe_finished(time.monotonic() - live.arrival_s, reason)

    # -- death and shutdown ------------------------------------------------------------------------
    def _on_core_exit(self) -> None:
        assert self._process is not None
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if not self._is_stopping:
            asyncio.get_running_loop().create_task(self._die())

    async def _die(self) -> None:
        await asyncio.sleep(_EXIT_GRACE_S)
        assert self._process is not None
        self._process.join(timeout=1.0)
        reason = f"engine core process (pid {self._process.pid}) exited with code {self._process.exitcode}"
        if self._fatal_message:
            reason += f": {self._fatal_message}"
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        logger.error("%s", reason)
        error = EngineDeadError(reason)
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(error)
        self._acks.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(reason))
        for request_id, live in list(self._live.items()):
            live.queue.put_nowait(error)
            self._finish(request_id, "error")
        self.dead_event.set()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, stop the core (terminate, then kill, if it will not stop), free sockets."""
        was_stopping, self._is_stopping = self._is_stopping, True
        if was_stopping and self._process is None:
            return
        process = self._process
        if process is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(process.sentinel)
            if process.exitcode is None:
                self.abort_all(EngineDeadError("the engine shut down"))
                self._send(Shutdown())
                await _join(process, timeout_s)
            if process.exitcode is None:
                logger.warning("engine core did not stop in %.0f s; terminating it", timeout_s)
                process.terminate()
                await _join(process, 3.0)
            if process.exitcode is None:
                process.kill()
                await _join(process, 3.0)
        stopped = EngineDeadError("the engine shut down")
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(stopped)
        self._acks.clear()
        for live in self._live.values():
            live.queue.put_nowait(stopped)
        self._live.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        self._process = None


async def _join(process: multiprocessing.process.BaseProcess, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while process.exitcode is None and time.monotonic() < deadline_s:
        await asyncio.sleep(0.05)
    process.join(timeout=0)
