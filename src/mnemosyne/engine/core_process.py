"""The engine-core process: an LLMEngine stepping in a loop, fed and drained over ZeroMQ.

It runs in its own spawned process so that HTTP parsing and tokenization never stall a step, and
it never tokenizes: prompts arrive as token ids, and only deltas go back.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import msgspec
import zmq
from tqdm import tqdm

from mnemosyne.config import EngineConfig
from mnemosyne.engine.core_wire import (
    AbortRequests,
    Added,
    AddRequest,
    Delta,
    Fatal,
    FromCore,
    Logprob,
    Progress,
    Ready,
    Rejected,
    Shutdown,
    Stats,
    StepReport,
    ToCore,
    unpack_token_ids,
)
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.outputs import RequestOutput
from mnemosyne.heap import freeze_startup_heap

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
"""An idle core still reports its stats this often, so the API process sees it is alive."""
_IDLE_POLL_MS = 10
"""Wait for input this long when requests exist but none could be scheduled, instead of spinning."""


class EngineCore:
    """Turns input messages into engine calls and engine outputs into delta messages."""

    def __init__(self, engine: LLMEngine, send: Callable[[FromCore], None], progress_s: float):
        self.engine = engine
        self.send = send
        self.progress_s = progress_s
        self._last_report_s: dict[str, float] = {}
        """Requests still waiting for their first token -> when their progress was last reported."""
        self._is_stats_stale = True

    def handle(self, message: ToCore) -> bool:
        """Apply one input message; False means shut down."""
        if isinstance(message, AddRequest):
            try:
                self.engine.add_request(unpack_token_ids(message.token_ids), message.params,
                                        message.request_id, message.arrival_s, message.priority,
                                        message.deadline_s)
            except ValueError as e:
                self.send(Rejected(message.request_id, str(e)))
                return True
            self._last_report_s[message.request_id] = time.monotonic()
            self.send(Added(message.request_id))
        elif isinstance(message, AbortRequests):
            self.engine.abort_request(message.request_ids)
            for request_id in message.request_ids:
                self._last_report_s.pop(request_id, None)
        elif isinstance(message, Shutdown):
            return False
        self._is_stats_stale = True
        return True

    def step(self) -> bool:
        """Run one engine step and report it; False if there was nothing to schedule."""
        outputs = self.engine.step()
        plan = self.engine.last_plan
        if not outputs and (plan is None or not plan.chunks):
            return False
        landed = self.engine.landed
        if not outputs and not landed:
            return True  # returned early to take in arrivals before the next step is planned
        deltas = [self._delta(out) for out in outputs]
        for delta in deltas:
            self._last_report_s.pop(delta.request_id, None)  # it has tokens now: no more progress
        step_s, num_tokens, num_requests = 0.0, 0, 0
        if landed:
            done_plan, step_s = landed[-1]
            num_tokens, num_requests = done_plan.num_tokens, len(done_plan.chunks)
        self.send(StepReport(deltas, self._progress(), self._stats(step_s, num_tokens, num_requests)))
        self._is_stats_stale = False
        return True

    def report_idle(self, force: bool) -> None:
        """Send stats without a step: after input changed them, or as a heartbeat."""
        if force or self._is_stats_stale:
            self.send(StepReport([], [], self._stats(0.0, 0, 0)))
            self._is_stats_stale = False

    def _delta(self, out: RequestOutput) -> Delta:
        completion = out.outputs[0]
        new_ids = completion.new_token_ids
        logprobs = None
        if completion.logprobs is not None:
            recent = completion.logprobs[len(completion.logprobs) - len(new_ids):] if new_ids else []
            logprobs = [Logprob(lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs)) for lp in recent]
        return Delta(out.request_id, completion.new_text, list(new_ids), logprobs, completion.finish_reason,
                     out.num_cached_tokens)

    def _progress(self) -> list[Progress]:
        now_s = time.monotonic()
        requests = self.engine.scheduler.requests
        due = [rid for rid, last_s in self._last_report_s.items() if now_s - last_s >= self.progress_s]
        reports = []
        for request_id in due:
            request = requests.get(request_id)
            if request is None:
                del self._last_report_s[request_id]
                continue
            self._last_report_s[request_id] = now_s
            reports.append(Progress(request_id, request.num_computed_tokens, request.num_prompt_tokens))
        return reports

    def _stats(self, step_s: float, num_step_tokens: int, num_step_requests: int) -> Stats:
        scheduler = self.engine.scheduler
        num_preempted = sum(1 for r in scheduler.waiting if r.metrics.num_preemptions)
        pool = scheduler.pool
        return Stats(len(scheduler.running), len(scheduler.waiting), num_preempted, scheduler.num_preemptions,
                     pool.usage, step_s, num_step_tokens, num_step_requests, pool.num_queried_tokens,
                     pool.num_hit_tokens, pool.num_evicted_blocks)

    def run(self, inbox: zmq.Socket, parent_pid: int) -> None:
        """Step until told to shut down or orphaned; input is drained between steps."""
        decoder = msgspec.msgpack.Decoder(ToCore)
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        last_heartbeat_s = 0.0
        timeout_ms = 0
        while True:
            if poller.poll(timeout_ms):
                while True:
                    try:
                        raw = inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not self.handle(decoder.decode(raw)):
                        return
            if os.getppid() != parent_pid:
                logger.error("the API process is gone; the engine core exits")
                return
            has_requests = self.engine.has_unfinished_requests()
            if has_requests and self.step():
                timeout_ms = 0  # a step's report doubles as a heartbeat
                continue
            now_s = time.monotonic()
            is_heartbeat_due = now_s - last_heartbeat_s >= HEARTBEAT_S
            self.report_idle(force=is_heartbeat_due)
            if is_heartbeat_due:
                last_heartbeat_s = now_s
            timeout_ms = _IDLE_POLL_MS if has_requests else int(HEARTBEAT_S * 1000)


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, progress_s: float,
                    log_level: int) -> None:
    """Entry point of the spawned core process. Exits 0 on Shutdown, 1 after sending Fatal."""
    # Ctrl+C reaches the whole process group; the API process decides how to stop the core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a named multiprocessing semaphore, which a killed core leaks (and the
    # resource tracker then warns about); the core draws its progress bars from one thread anyway.
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    parent_pid = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()

    def send(message: FromCore) -> None:
        outbox.send(encoder.encode(message))

    engine: LLMEngine | None = None
    exit_code = 0
    try:
        engine = LLMEngine(config)
        pool = engine.scheduler.pool
        send(Ready(engine.model_name, engine.max_model_len, engine.scheduler.max_model_len,
                   engine.model_config.vocab_size, pool.num_blocks, pool.block_size))
        freeze_startup_heap()
        EngineCore(engine, send, progress_s).run(inbox, parent_pid)
    except Exception as e:
        logger.exception("engine core failed")
        send(Fatal(f"{type(e).__name__}: {e}"))
        exit_code = 1
    finally:
        if engine is not None:
            engine.shutdown()
        inbox.close(linger=0)
        outbox.close(linger=2000)  # let Fatal reach the API process
        ctx.term()
    sys.exit(exit_code)
