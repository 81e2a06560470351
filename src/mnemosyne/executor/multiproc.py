"""World size > 1: one worker process per device. The engine publishes each plan over ZeroMQ,
collects stage-0 reports and the output rank's results (several steps may be in flight through
the pipeline stages), and watches every rank: a worker that raises, dies or falls silent ends the
run with an error naming it, and the others are shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import replace

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.distributed.topology import ParallelLayout, check_shardable
from mnemosyne.executor import wire
from mnemosyne.executor.channel import HEARTBEAT_INTERVAL_S, EngineChannel
from mnemosyne.executor.replica_results import ReplicaResults
from mnemosyne.executor.worker import RuntimeInfo
from mnemosyne.executor.worker_process import WorkerSpec
from mnemosyne.plan import StepEvent, StepPlan, StepResult

logger = logging.getLogger(__name__)

DIST_TIMEOUT_S = float(os.environ.get("MNEMOSYNE_DIST_TIMEOUT_S", "600"))
"""Rendezvous and collective timeout: a rank stuck on a dead peer fails instead of hanging."""
HEARTBEAT_TIMEOUT_S = float(os.environ.get("MNEMOSYNE_HEARTBEAT_TIMEOUT_S", "10"))
"""A rank on another node (no process handle to watch) is declared dead after this much silence."""
_POLL_S = 0.05
_FAULT_GRACE_S = 0.5
"""After the first fault, how long to keep listening so the report names the rank that failed first."""
_REMOTE_FAULT_GRACE_S = 4 * HEARTBEAT_INTERVAL_S
"""The same with ranks on other nodes: long enough to see which of them stopped beating, since a
dead remote rank shows up first as connection errors on its peers."""
_STOP_TIMEOUT_S = 5.0


class WorkerFailedError(RuntimeError):
    """A worker raised, died or fell silent; the message names its rank and why."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def layout_of(config: EngineConfig) -> ParallelLayout:
    return ParallelLayout(config.kv_parallel_size, config.pipeline_parallel_size, config.tensor_parallel_size,
                          config.layer_split)


def check_layout(config: EngineConfig, model_config: ModelConfig) -> ParallelLayout:
    """The layout, or ValueError (before any process starts) if it cannot run yet or cannot be sharded."""
    layout = layout_of(config)
    check_shardable(model_config, layout)
    if config.pp_scatter_gather and model_config.hidden_size % layout.tp_size:
        raise ValueError(f"--pp-scatter-gather: the model's hidden size {model_config.hidden_size} is not "
                         f"divisible by --tensor-parallel-size {layout.tp_size}")
    return layout


class MultiprocExecutor:
    """Drives `layout.world_size` workers. `local_procs` are the worker processes this engine
    started (watched through their process handles); other ranks are watched by heartbeat."""

    def __init__(self, layout: ParallelLayout, channel: EngineChannel, local_procs: dict[int, subprocess.Popen]):
        self.layout = layout
        self._channel = channel
        self._procs = local_procs
        self._last_seen_s: dict[int, float] = {}
        self._errors: list[wire.WorkerError] = []
        self._failure: WorkerFailedError | None = None
        self._readies: dict[int, RuntimeInfo] = {}
        self._results = ReplicaResults(layout.kvp_size)
        # Stops the workers even if shutdown() is never called (the LLM object is dropped, or the
        # interpreter exits); must not reference self.
        self._stop = weakref.finalize(self, _stop_workers, channel, list(local_procs.values()))
        try:
            self.info = self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    @property
    def worker_pids(self) -> dict[int, int]:
        """Global rank -> pid of the workers this process started."""
        return {rank: proc.pid for rank, proc in self._procs.items()}

    @property
    def worker_infos(self) -> dict[int, RuntimeInfo]:
        """Global rank -> what that worker found at start-up (devices, shard and KV-cache sizes)."""
        return dict(sorted(self._readies.items()))

    @property
    def num_stages(self) -> int:
        return self.layout.pp_size

    def execute(self, plan: StepPlan) -> StepResult:
        """Publish the plan to every rank and return the output rank's result (nothing else may be in
        flight); raises WorkerFailedError (and shuts every worker down) if any rank fails meanwhile."""
        self.submit(plan)
        while True:
            for event in self.wait_events():
                if isinstance(event, StepResult) and event.step_id == plan.step_id:
                    return event

    def submit(self, plan: StepPlan) -> None:
        """Publish the plan to every rank; each stage runs its plans in the order they were submitted."""
        if self._failure is not None:
            raise self._failure
        self._channel.publish(wire.TOPIC_PLAN, wire.encode_plan(plan))

    def wait_events(self, timeout_s: float | None = None) -> list[StepEvent]:
        """Stage reports and results that arrived, waiting up to timeout_s (None: until one does);
        results come in step order. Raises WorkerFailedError if any rank failed."""
        if self._failure is not None:
            raise self._failure
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            events = self._results.add([wire.DECODERS[kind].decode(body) for kind, body in self._receive(wait_s)
                                        if kind in (wire.KIND_RESULT, wire.KIND_STAGE_DONE)])
            if events or (deadline is not None and time.monotonic() >= deadline):
                return events

    def shutdown(self) -> None:
        self._stop()

    # -- start-up and fault detection -----------------------------------------------------------
    def _wait_ready(self) -> RuntimeInfo:
        world_size = self.layout.world_size
        while len(self._readies) < world_size or self._channel.num_subscribers < world_size:
            for kind, body in self._receive():
                if kind == wire.KIND_READY:
                    ready = wire.DECODERS[kind].decode(body)
                    self._readies[ready.rank] = ready.info
        info = self._readies[self.layout.output_rank]
        return replace(info, num_kv_blocks=min(i.num_kv_blocks for i in self._readies.values()))

    def _receive(self, timeout_s: float = _POLL_S) -> list[tuple[bytes, bytes]]:
        """Messages other than heartbeats and errors; raises on a worker error or a dead rank."""
        messages = self._collect(timeout_s)
        if self._errors or self._silent_ranks():
            self._fail()
        return messages

    def _collect(self, timeout_s: float) -> list[tuple[bytes, bytes]]:
        now = time.monotonic()
        kept = []
        for kind, body in self._channel.poll(timeout_s):
            if kind == wire.KIND_HEARTBEAT:
                self._last_seen_s[wire.DECODERS[kind].decode(body)] = now
            elif kind == wire.KIND_ERROR:
                self._errors.append(wire.DECODERS[kind].decode(body))
            else:
                kept.append((kind, body))
        return kept

    def _silent_ranks(self, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[tuple[int, str]]:
        """(rank, why) of ranks that stopped without reporting an error."""
        reported = {e.rank for e in self._errors}
        silent = [(rank, _exit_reason(proc.returncode)) for rank, proc in self._procs.items()
                  if proc.poll() is not None and rank not in reported]
        now = time.monotonic()
        silent += [(rank, f"stopped responding (no heartbeat for {now - seen:.1f} s; its process probably died)")
                   for rank, seen in sorted(self._last_seen_s.items(), key=lambda item: item[1])
                   if rank not in self._procs and rank not in reported and now - seen > heartbeat_timeout_s]
        return silent

    def _fail(self) -> None:
        has_remote = len(self._procs) < self.layout.world_size
        deadline = time.monotonic() + (_REMOTE_FAULT_GRACE_S if has_remote else _FAULT_GRACE_S)
        while time.monotonic() < deadline:  # let the other ranks' reports arrive
            self._collect(_POLL_S)
        # Once something failed, a remote rank that skipped a few beats is the likeliest first cause.
        silent = self._silent_ranks(min(HEARTBEAT_TIMEOUT_S, 2 * HEARTBEAT_INTERVAL_S))
        if silent:
            rank, why = silent[0]
            message = f"worker rank {rank} {why}"
        else:
            first = self._errors[0]
            rank, message = first.rank, f"worker rank {first.rank} raised {first.summary}\n{first.traceback}"
        others = sorted(({r for r, _ in silent} | {e.rank for e in self._errors}) - {rank})
        if others:
            message += f"\n(ranks {others} failed too, most likely because of rank {rank})"
        self._failure = WorkerFailedError(rank, message)
        logger.error("%s; shutting the workers down", message.splitlines()[0])
        reported = {e.rank for e in self._errors}
        for peer, proc in self._procs.items():
            if peer not in reported and proc.poll() is None:
                proc.terminate()  # silent after the grace period: stuck in a collective (NCCL waits)
        self.shutdown()
        raise self._failure


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        return f"died unexpectedly (killed by {signal.Signals(-exitcode).name})"
    return f"exited unexpectedly with code {exitcode}"


def _stop_workers(channel: EngineChannel, procs: list[subprocess.Popen]) -> None:
    try:
        channel.publish(wire.TOPIC_STOP)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.poll() is None:  # stuck in a collective with a dead peer
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        channel.close()


# -- starting workers ---------------------------------------------------------------------------
def spawn_executor(config: EngineConfig, model_config: ModelConfig) -> MultiprocExecutor:
    """One node: spawn config.world_size workers, rendezvous on a free loopback port."""
    layout = check_layout(config, model_config)
    channel = EngineChannel("127.0.0.1")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    world_size = layout.world_size
    specs = [WorkerSpec(config, rank, world_size, rank, world_size, init_method, channel.addresses,
                        share_addresses=False, dist_timeout_s=DIST_TIMEOUT_S, log_level=engine_log_level())
             for rank in range(world_size)]
    return MultiprocExecutor(layout, channel, start_processes(specs))


def start_processes(specs: list[WorkerSpec]) -> dict[int, subprocess.Popen]:
    """Start each spec's worker in a fresh interpreter (spawn semantics: no fork, so CUDA and threads
    are safe). Unlike multiprocessing's spawn it does not re-import the caller's __main__, so a
    script that builds an LLM needs no `if __name__ == "__main__"` guard."""
    # The child sees the parent's import path and inherits the rest of its env (NCCL_* included).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = {}
    for spec in specs:
        proc = subprocess.Popen([sys.executable, "-m", "mnemosyne.executor.worker_process"],
                                stdin=subprocess.PIPE, env=env)
        with proc.stdin:  # type: ignore[union-attr]
            pickle.dump(spec, proc.stdin)  # a local pipe from the parent: trusted
        procs[spec.rank] = proc
    return procs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_log_level() -> int:
    return logging.getLogger().getEffectiveLevel()
