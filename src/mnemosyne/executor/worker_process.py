"""The main loop of one worker process: join the process group, build the rank's groups and model
shard, then run each plan the engine publishes until told to stop. Any exception goes back to the
engine with its traceback, and the worker exits."""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.distributed import comm
from mnemosyne.distributed.topology import ParallelLayout, build_topology
from mnemosyne.executor import wire
from mnemosyne.executor.channel import ChannelAddresses, WorkerChannel
from mnemosyne.executor.worker import Worker
from mnemosyne.heap import freeze_startup_heap
from mnemosyne.models.loaders import resolve_model
from mnemosyne.plan import StageDone
from mnemosyne.runner.model_runner import PendingStep

logger = logging.getLogger("mnemosyne.executor.worker_process")  # also when run as __main__


_ERROR_EXIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; small and picklable, so spawn can pass it."""

    config: EngineConfig
    rank: int
    world_size: int
    local_rank: int
    """Index of this process on its node: picks the GPU."""
    local_world_size: int
    """Workers on this node: they share its CPU cores."""
    init_method: str
    """torch.distributed rendezvous: tcp://host:port for spawn, env:// under torchrun."""
    addresses: ChannelAddresses | None
    """Where the engine listens; None on ranks that learn it from rank 0 after joining."""
    share_addresses: bool
    """True under torchrun: rank 0 broadcasts the addresses over the new process group."""
    dist_timeout_s: float
    """Timeout of the rendezvous and of every collective."""
    log_level: int = logging.WARNING


def worker_device(config: EngineConfig, local_rank: int) -> torch.device:
    """cuda:{local_rank} when CUDA is asked for (or auto and present), else the CPU."""
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def run_worker(spec: WorkerSpec) -> int:
    """Process entry point; returns the exit code (0 after an orderly stop)."""
    _configure_process(spec)
    channel = WorkerChannel(spec.addresses, spec.rank) if spec.addresses else None
    try:
        device = worker_device(spec.config, spec.local_rank)
        world = comm.init_world(comm.backend_for(device), spec.init_method, spec.rank, spec.world_size,
                                spec.dist_timeout_s)
        if spec.share_addresses:
            addresses = world.broadcast_object(spec.addresses, 0, device)
            channel = channel or WorkerChannel(addresses, spec.rank)
        assert channel is not None  # spawn passes addresses to all ranks, torchrun to rank 0
        _serve(spec, world, device, channel)
        return 0
    except BaseException as e:  # the engine must hear about any failure; then this worker exits
        _report(channel, spec.rank, e)
        # Exit only when the engine says so, and then with 0: the engine owns the failure report.
        # Under torchrun a non-zero exit makes the agent kill its node's other processes, the engine
        # among them, before it could name the rank that failed first.
        return 0 if channel is not None and channel.wait_for_stop(_ERROR_EXIT_TIMEOUT_S) else 1
    finally:
        if channel is not None:
            channel.close()
        comm.destroy_world()


def _serve(spec: WorkerSpec, world: comm.Group, device: torch.device, channel: WorkerChannel) -> None:
    config = spec.config
    layout = ParallelLayout(config.kv_parallel_size, config.pipeline_parallel_size, config.tensor_parallel_size,
                            config.layer_split)
    topology = build_topology(layout, world)
    loader = resolve_model(config.model, seed=config.seed)
    model_config = loader.load_config()
    layer_range = layout.layer_range(topology.pp_rank, model_config.num_layers)
    worker = Worker(config, model_config, loader, topology.tp_group, layer_range, device, world, topology.pp_group,
                    kvp_group=topology.kvp_group)
    channel.send(wire.KIND_READY, wire.encode(wire.WorkerReady(spec.rank, worker.info)))
    logger.info("ready: kvp_rank %d, pp_rank %d, tp_rank %d, layers %s, %d KV blocks", topology.kvp_rank,
                topology.pp_rank, topology.tp_rank, layer_range, worker.info.num_kv_blocks)
    # Stage 0 tells the engine when a micro-batch has left it (the SPP rule needs it); with a trace
    # every stage reports its timing. tp rank 0 speaks for its tp group.
    reports_stage = topology.tp_rank == 0 and (config.trace_file is not None or (
        topology.is_first_pp_stage and topology.kvp_rank == 0 and layout.pp_size > 1))
    stage_clock = StageClock(device, is_timed=config.trace_file is not None)
    freeze_startup_heap()
    # Async scheduling: the engine may send a step's plan before the previous step's result, so the
    # device runs back to back; the output rank's results go out from a thread of their own.
    is_async = config.async_scheduling and layout.pp_size == 1
    sender = ResultSender(channel, spec.rank) if is_async and topology.is_output_rank else None
    while True:
        topic, payload = channel.recv()
        if topic == wire.TOPIC_STOP:
            if sender is not None:
                sender.close()
            worker.runner.link.wait()
            worker.close()
            channel.stopping.set()
            return
        plan = wire.decode_plan(payload)
        begin_s = time.time()
        step = worker.launch(plan)
        if reports_stage:
            end_s = stage_clock.done_s()
            start_s = min(max(begin_s, worker.runner.link.received_s), end_s)
            channel.send(wire.KIND_STAGE_DONE, wire.encode(StageDone(
                plan.step_id, topology.kvp_rank, topology.pp_rank, start_s, end_s)))
        if not topology.is_output_rank:  # one per KV replica, for the requests it samples; its tp ranks agree
            continue
        if sender is not None:
            sender.put(step)
            continue
        result = step.result()
        if not config.sequence_pipelining and not result.token_ids and device.type == "cuda":
            # Without SPP the next chunk waits for the whole pipeline: a step that sampled
            # nothing (no host sync) is reported once its kernels have run, not when queued.
            torch.cuda.current_stream(device).synchronize()
        channel.send(wire.KIND_RESULT, wire.encode(result))


class ResultSender:
    """Sends each launched step's result, in step order, from a thread of its own as soon as the step's
    kernels have run, while the main thread receives and launches the next plan. Sent from the main
    thread after that launch (several ms of host time for an eager step with prefill work), results
    reached the engine late and in pairs under kvp=4 serving with --async-prefill (call77: steps timed
    at 72 ms and then 0 ms), and the TBT feedback, reading the late ones as slow steps, cut the step
    budget to a third."""

    SWITCH_INTERVAL_S = 0.0005
    """The interpreter's GIL switch interval while a sender runs (Python's default: 5 ms). The main
    thread launches an eager step's kernels holding the GIL, and the sender waits up to an interval
    for it each time it wakes (the step's event, then the send): call78's kvp=4 steps that followed a
    new request's still landed up to 20 ms late, their next step 6 ms after them."""

    def __init__(self, channel: WorkerChannel, rank: int):
        sys.setswitchinterval(min(sys.getswitchinterval(), self.SWITCH_INTERVAL_S))
        self._rank = rank
        self._queue: queue.SimpleQueue[PendingStep | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(channel,), name="mnemosyne-results", daemon=True)
        self._thread.start()

    def put(self, step: PendingStep) -> None:
        self._queue.put(step)

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self, channel: WorkerChannel) -> None:
        socket = channel.connect_results()  # ZeroMQ sockets stay with the thread that uses them
        try:
            while (step := self._queue.get()) is not None:
                try:
                    message = (wire.KIND_RESULT, wire.encode(step.result()))  # waits for the step's kernels
                except Exception as e:  # a device error surfaces here: the engine must hear of it
                    summary = traceback.format_exception_only(e)[-1].strip()
                    message = (wire.KIND_ERROR, wire.encode(wire.WorkerError(
                        self._rank, summary, "".join(traceback.format_exception(e)))))
                socket.send_multipart(message)
        finally:
            socket.close()


class StageClock:
    """When a stage reports a micro-batch done to the engine (`StageDone.end_s`).

    With a trace, once the micro-batch's kernels have run: the trace shows real timings. Otherwise on
    a GPU, once they are queued and the previous micro-batch's kernels have run. Stage 0 needs no
    more: whatever uses its work afterwards is ordered after it on the same stream (the next
    micro-batch's KV reads and writes, block-table and input copies from pinned memory, the send to
    the next stage), so the engine's next plan can be on its way while the GPU still runs this one,
    and the GPU does not idle for a control-plane round trip between chunks. Waiting for the
    previous micro-batch keeps at most two queued, so the scheduler still decides each micro-batch
    shortly before stage 0 can start it, and a request that arrives meanwhile waits behind one
    micro-batch at most.
    """

    def __init__(self, device: torch.device, is_timed: bool):
        self.device = device
        self.is_timed = is_timed
        self._queued: torch.cuda.Event | None = None
        """Recorded on the stream after the latest reported micro-batch's kernels."""

    def done_s(self) -> float:
        """time.time() once the micro-batch just executed counts as done on this stage (see above)."""
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if self.is_timed:
                stream.synchronize()
            else:
                previous, self._queued = self._queued, stream.record_event()
                if previous is not None:
                    previous.synchronize()
        return time.time()


def _report(channel: WorkerChannel | None, rank: int, error: BaseException) -> None:
    summary = traceback.format_exception_only(error)[-1].strip()
    logger.error("worker rank %d failed: %s", rank, summary)
    if channel is not None:
        message = wire.WorkerError(rank, summary, "".join(traceback.format_exception(error)))
        channel.send(wire.KIND_ERROR, wire.encode(message))


def _configure_process(spec: WorkerSpec) -> None:
    # Rank-aware and quiet by default: the engine's level, each line tagged with its rank.
    logging.basicConfig(level=spec.log_level, force=True,
                        format=f"%(asctime)s %(levelname)s [rank {spec.rank}] %(name)s: %(message)s")
    if spec.rank != 0:
        os.environ["MNEMOSYNE_QUIET"] = "1"  # one progress bar per run, from rank 0
    # Workers on one node share its cores; oversubscribed threads slow every collective down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.local_world_size))


def _main() -> None:
    """`python -m mnemosyne.executor.worker_process`: the engine writes a pickled WorkerSpec to stdin."""
    spec = pickle.load(sys.stdin.buffer)
    # Ctrl-C reaches the whole process group: the engine handles it and stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run_worker(spec))


if __name__ == "__main__":
    _main()
