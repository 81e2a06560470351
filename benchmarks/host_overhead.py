"""Host time of a decode step. With `dummy:tiny` on the CPU the model's compute is small, so a step's
time is mostly the engine's and the workers' own work: in process (world size 1) and over worker
processes (tp=2 and pp=2 over gloo). Each configuration runs twice: plain, for the step time (the
fastest of --repeats windows), and with every stage of the step's path timed (`time.perf_counter`
around the functions themselves, in the engine and in each worker process), for where the time goes
in that same window, with each process's CPU time per step beside it.

    python benchmarks/host_overhead.py [--layouts 1,tp2,pp2] [--batch 1,8] [--steps 100] [--repeats 3]

On a GPU (`--device cuda`, one GPU per worker) the spans are host time too: a CUDA graph's replay
returns once launched, and the sample's `.tolist()` then waits for the device, so the device's
time shows up in "execute: other".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

_SPANS_DIR_ENV = "HOST_OVERHEAD_SPANS_DIR"
"""Set by the benchmark for the worker processes it starts: where each writes its spans at exit."""


class Spans:
    """Host seconds per span name, filed under the latest step id this process has seen, so that
    the warm-up's steps can be left out afterwards. Span "process CPU" is the CPU time the whole
    process (every thread) used from one step's start to the next: unlike wall time, it does not
    grow while a loaded machine keeps the process waiting for a core."""

    def __init__(self) -> None:
        self.steps: dict[int, Counter] = defaultdict(Counter)
        self.step_id = 0
        self._step_cpu_s = time.process_time()
        self._originals: list[tuple[Any, str, Any]] = []
        self._events: list[tuple[int, str, Any, Any]] = []
        """(step id, span, start and end CUDA events) of device spans not yet resolved."""

    def add(self, name: str, seconds: float) -> None:
        self.steps[self.step_id][name] += seconds

    def wrap(self, owner: Any, attr: str, name: str, step_of: Callable[[Any], int] | None = None) -> None:
        """Time every call of owner.attr as span `name`; step_of(result) names a new current step."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            self.add(name, time.perf_counter() - start)
            if step_of is not None:
                cpu_s = time.process_time()
                self.add("process CPU", cpu_s - self._step_cpu_s)
                self.step_id, self._step_cpu_s = step_of(result), cpu_s
            return result

        self.replace(owner, attr, timed)

    def replace(self, owner: Any, attr: str, value: Any) -> None:
        self._originals.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def wrap_device(self, owner: Any, attr: str, name: str) -> None:
        """Time the device's work between the start and the end of every call of owner.attr with CUDA
        events: from its first kernel to its last where the host keeps ahead (a graph replay)."""
        import torch

        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            result = inner(*args, **kwargs)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self.step_id, name, start, end))
            return result

        self.replace(owner, attr, timed)

    def resolve_device_spans(self) -> None:
        """Add the device spans timed so far (waits for the device)."""
        if self._events:
            self._events[-1][3].synchronize()
        for step_id, name, start, end in self._events:
            self.steps[step_id][name] += start.elapsed_time(end) / 1e3
        self._events.clear()

    def wrap_decoder(self, decoders: dict, kind: bytes, name: str) -> None:
        """Time decoders[kind].decode (a msgspec Decoder, whose methods cannot be replaced)."""
        inner = decoders[kind]
        self._originals.append((decoders, kind, inner))
        decoders[kind] = _TimedDecoder(self, inner, name)

    def restore(self) -> None:
        """Undo every wrap, so that a later plain run pays nothing for them."""
        for owner, key, inner in reversed(self._originals):
            if isinstance(owner, dict):
                owner[key] = inner
            else:
                setattr(owner, key, inner)
        self._originals.clear()

    def total(self, window: Window) -> Counter:
        """Seconds per span over the window's steps."""
        out = Counter()
        for step_id, spans in self.steps.items():
            if window.first_step_id <= step_id < window.end_step_id:
                out.update(spans)
        return out


class _TimedDecoder:
    def __init__(self, spans: Spans, decoder: Any, name: str):
        self.spans, self.decoder, self.name = spans, decoder, name

    def decode(self, body: bytes) -> Any:
        start = time.perf_counter()
        message = self.decoder.decode(body)
        self.spans.add(self.name, time.perf_counter() - start)
        return message


def time_worker_side(spans: Spans) -> None:
    """A worker's path through a step: applying the plan, inputs, model, sampling."""
    import torch

    from mnemosyne.executor.worker import Worker
    from mnemosyne.models.llama import LlamaForCausalLM
    from mnemosyne.runner import model_runner
    from mnemosyne.runner.model_runner import ModelRunner

    spans.wrap(Worker, "execute", "execute")
    spans.wrap(ModelRunner, "apply_plan", "execute: apply plan")
    spans.wrap(ModelRunner, "prepare", "execute: prepare inputs")
    spans.wrap(ModelRunner, "_forward", "execute: forward")
    spans.wrap(LlamaForCausalLM, "compute_logits", "execute: logits")
    spans.wrap(model_runner, "sample", "execute: sample")
    spans.wrap(model_runner, "_logprobs", "execute: logprobs")
    if torch.cuda.is_available():
        from mnemosyne.runner.cuda_graphs import DecodeGraphs

        spans.wrap(DecodeGraphs, "run", "execute: graph replay")
        spans.wrap_device(DecodeGraphs, "run", "device: graph replay")
        spans.wrap_device(ModelRunner, "_forward", "device: forward")


def time_worker_process(spans: Spans) -> None:
    """The worker process's loop around `execute`: the control plane."""
    from mnemosyne.executor import wire, worker_process
    from mnemosyne.executor.channel import WorkerChannel

    spans.wrap(WorkerChannel, "recv", "wait for plan")
    spans.wrap(wire, "decode_plan", "decode plan", step_of=lambda plan: plan.step_id)
    spans.wrap(wire, "encode", "encode reply")
    spans.wrap(WorkerChannel, "send", "send reply")
    spans.wrap(worker_process.StageClock, "done_s", "stage done")
    time_worker_side(spans)


def time_engine_side(spans: Spans) -> None:
    """The engine's step: schedule, plan out, results in, update, emit."""
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.executor import wire
    from mnemosyne.executor.channel import EngineChannel
    from mnemosyne.scheduler.scheduler import Scheduler

    spans.wrap(LLMEngine, "step", "step")
    spans.wrap(Scheduler, "schedule", "schedule", step_of=lambda plan: plan.step_id)
    spans.wrap(wire, "encode_plan", "encode plan")
    spans.wrap(EngineChannel, "publish", "publish")
    spans.wrap(EngineChannel, "poll", "wait for workers")
    for kind in (wire.KIND_RESULT, wire.KIND_STAGE_DONE):
        spans.wrap_decoder(wire.DECODERS, kind, "decode replies")
    spans.wrap(Scheduler, "stage_cleared", "stage cleared")
    spans.wrap(Scheduler, "update", "update")
    spans.wrap(LLMEngine, "_record_logprobs", "record logprobs")
    spans.wrap(LLMEngine, "_emit", "emit")


def worker_main() -> None:
    """A worker process with its spans timed; they are written to the spans folder at exit."""
    import atexit

    from mnemosyne.executor import worker_process

    spans = Spans()
    time_worker_process(spans)
    out = Path(os.environ[_SPANS_DIR_ENV]) / f"{os.getpid()}.json"

    def write() -> None:
        spans.resolve_device_spans()
        out.write_text(json.dumps({"steps": spans.steps}))

    atexit.register(write)
    worker_process._main()


def _start_timed_processes(specs: list) -> dict[int, subprocess.Popen]:
    """multiproc.start_processes, with this file as the worker's entry point."""
    import pickle

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = {}
    for spec in specs:
        proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, env=env)
        with proc.stdin:
            pickle.dump(spec, proc.stdin)
        procs[spec.rank] = proc
    return procs


# -- one configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1

    @staticmethod
    def parse(text: str) -> Layout:
        sizes = {kind: int(n) for kind, n in re.findall(r"(tp|pp)(\d+)", text)}
        if text != "1" and not sizes:
            raise ValueError(f"layout {text!r}: expected 1, tpN, ppN or tpNppM")
        return Layout(text, sizes.get("tp", 1), sizes.get("pp", 1))


@dataclass(frozen=True)
class Window:
    """Consecutive decode rounds, each one token for every request of the batch."""

    first_step_id: int
    end_step_id: int
    """One past the last step id of the window."""
    round_s: float
    """Mean seconds per round."""


def decode_windows(engine, batch: int, args: argparse.Namespace) -> list[Window]:
    """`args.repeats` windows of `args.steps` decode rounds of `batch` requests, after `args.warmup` rounds."""
    from mnemosyne.request import SamplingParams

    params = SamplingParams(max_tokens=args.warmup + args.repeats * args.steps, ignore_eos=True)
    for i in range(batch):
        engine.add_request([3 + (i * 7 + j) % 500 for j in range(args.prompt_len)], params)
    requests = list(engine.scheduler.requests.values())
    marks = []
    """(next step id, time) at the end of the warm-up and of each window."""
    for num_tokens in range(args.warmup, args.warmup + args.repeats * args.steps + 1, args.steps):
        while min(r.num_output_tokens for r in requests) < num_tokens:
            engine.step()
        marks.append((engine.scheduler._step_id + 1, time.perf_counter()))
    return [Window(first, end, (end_s - start_s) / args.steps)
            for (first, start_s), (end, end_s) in itertools.pairwise(marks)]


def run(layout: Layout, batch: int, args: argparse.Namespace, timed: bool) -> dict[str, Any]:
    """The fastest window's seconds per decode round and, when timed, its seconds per span: the
    engine's, and each worker rank's (in process, rank 0's spans are the engine process's)."""
    from mnemosyne.config import EngineConfig
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.executor import multiproc

    config = EngineConfig(model=args.model, device=args.device, tensor_parallel_size=layout.tp,
                          pipeline_parallel_size=layout.pp, max_num_seqs=max(batch, 8),
                          kv_cache_memory=args.kv_cache_memory or (0.05 if args.device == "cpu" else None),
                          max_model_len=args.prompt_len + args.warmup + args.repeats * args.steps + 16, seed=0)
    is_local = layout.tp * layout.pp == 1
    spans = Spans()
    with tempfile.TemporaryDirectory() as spans_dir:
        if timed:
            os.environ[_SPANS_DIR_ENV] = spans_dir
            spans.replace(multiproc, "start_processes", _start_timed_processes)
            time_engine_side(spans)
            if is_local:
                time_worker_side(spans)
        try:
            engine = LLMEngine(config)
            try:
                best = min(decode_windows(engine, batch, args), key=lambda w: w.round_s)
            finally:
                engine.shutdown()
        finally:
            spans.restore()
        spans.resolve_device_spans()
        workers = {0: spans.total(best)} if timed and is_local else {}
        if timed and not is_local:
            ranks = {pid: rank for rank, pid in engine.executor.worker_pids.items()}
            for path in Path(spans_dir).glob("*.json"):
                worker = Spans()
                worker.steps.update({int(k): Counter(v) for k, v in json.loads(path.read_text())["steps"].items()})
                workers[ranks[int(path.stem)]] = worker.total(best)
    return {"step_s": best.round_s, "engine": spans.total(best), "workers": workers}


# -- report ----------------------------------------------------------------------------------------
ENGINE_SPANS = ("schedule", "encode plan", "publish", "wait for workers", "decode replies", "stage cleared",
                "update", "record logprobs", "emit")
WORKER_SPANS = ("wait for plan", "decode plan", "execute: apply plan", "execute: prepare inputs",
                "execute: forward", "execute: graph replay", "execute: logits", "execute: sample",
                "execute: logprobs", "execute: other", "stage done", "encode reply", "send reply")
MODEL_SPANS = ("execute: forward", "execute: graph replay", "execute: logits")
DEVICE_SPANS = ("device: graph replay", "device: forward")


def _worker_rows(spans: Counter, num_steps: int) -> dict[str, float]:
    """ms per step of each worker span; "execute: other" is execute less its timed parts."""
    rows = {name: spans.get(name, 0.0) for name in WORKER_SPANS + DEVICE_SPANS}
    rows["execute: other"] = spans.get("execute", 0.0) - sum(v for k, v in spans.items() if k.startswith("execute: "))
    return {name: seconds / num_steps * 1e3 for name, seconds in rows.items()}


def summarize(layout: Layout, batch: int, plain: dict[str, Any], timed: dict[str, Any], num_steps: int) -> dict:
    """One configuration's row: the step, the engine's own host time (the step less its wait for the
    workers), the output worker's own host time and its model time, and each process's CPU time."""
    from mnemosyne.distributed.topology import ParallelLayout

    engine = {name: timed["engine"].get(name, 0.0) / num_steps * 1e3 for name in ENGINE_SPANS}
    workers = {rank: _worker_rows(spans, num_steps) for rank, spans in sorted(timed["workers"].items())}
    output = workers[ParallelLayout(1, layout.pp, layout.tp).output_rank]
    step_timed_ms = timed["engine"]["step"] / num_steps * 1e3
    worker_busy_ms = sum(v for k, v in output.items() if k in WORKER_SPANS and k != "wait for plan")
    is_local = layout.tp * layout.pp == 1
    # in process the engine "waits" while it runs the worker's execute itself
    waited_ms = worker_busy_ms if is_local else engine["wait for workers"]
    engine["other"] = step_timed_ms - sum(engine.values()) - (waited_ms if is_local else 0.0)
    model_ms = sum(output[k] for k in MODEL_SPANS)
    return {
        "layout": layout.name, "batch": batch, "step_ms": plain["step_s"] * 1e3, "step_timed_ms": step_timed_ms,
        "engine_ms": step_timed_ms - waited_ms, "worker_host_ms": worker_busy_ms - model_ms, "model_ms": model_ms,
        "device_ms": sum(output[k] for k in DEVICE_SPANS),
        "engine_cpu_ms": timed["engine"]["process CPU"] / num_steps * 1e3,
        "worker_cpu_ms": {rank: spans["process CPU"] / num_steps * 1e3
                          for rank, spans in sorted(timed["workers"].items()) if not is_local},
        "engine_spans_ms": engine, "worker_spans_ms": workers,
    }


def print_report(rows: list[dict], device: str) -> None:
    print(f"\n## Decode step, host time ({device}; ms per step)\n")
    print("| layout | batch | step | step, spans timed | engine: own host time | worker: own host time "
          "| worker: model | worker: device | CPU time: engine process, worker processes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cpu = ", ".join(f"{ms:.3f}" for ms in [r["engine_cpu_ms"], *r["worker_cpu_ms"].values()])
        device = f"{r['device_ms']:.3f}" if r["device_ms"] else "–"
        print(f"| {r['layout']} | {r['batch']} | {r['step_ms']:.3f} | {r['step_timed_ms']:.3f} | {r['engine_ms']:.3f} "
              f"| {r['worker_host_ms']:.3f} | {r['model_ms']:.3f} | {device} | {cpu} |")
    for r in rows:
        ranks = sorted(r["worker_spans_ms"])
        print(f"\n### {r['layout']}, batch {r['batch']}: ms per step, spans timed\n")
        print("| span | engine | " + " | ".join(f"rank {rank}" for rank in ranks) + " |")
        print("| --- | ---: |" + " ---: |" * len(ranks))
        for name, ms in r["engine_spans_ms"].items():
            if ms:
                print(f"| {name} | {ms:.3f} |" + " |" * len(ranks))
        for name in WORKER_SPANS + DEVICE_SPANS:
            values = [r["worker_spans_ms"][rank].get(name, 0.0) for rank in ranks]
            if any(values):
                print(f"| {name} | |" + "".join(f" {v:.3f} |" for v in values))


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        worker_main()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layouts", default="1,tp2,pp2", help="comma-separated: 1, tpN, ppN, tpNppM")
    parser.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="the decode context")
    parser.add_argument("--kv-cache-memory", type=float,
                        help="GiB of KV cache per worker (default: 0.05 on the CPU, the engine's default on a GPU)")
    parser.add_argument("--warmup", type=int, default=20, help="decode rounds before the timed ones")
    parser.add_argument("--steps", type=int, default=100, help="decode rounds per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the fastest is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the engine's process on the CPU (workers split the cores)")
    parser.add_argument("-o", "--output", help="also write the rows as JSON")
    args = parser.parse_args()
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for layout in map(Layout.parse, args.layouts.split(",")):
        for batch in map(int, args.batch.split(",")):
            plain = run(layout, batch, args, timed=False)
            timed = run(layout, batch, args, timed=True)
            rows.append(summarize(layout, batch, plain, timed, args.steps))
            print(f"{layout.name} batch {batch}: {rows[-1]['step_ms']:.3f} ms per step", flush=True)
    print_report(rows, args.device)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
