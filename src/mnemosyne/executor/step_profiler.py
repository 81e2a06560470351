"""A window of a worker's steps under torch.profiler, for finding where a step's time goes on the
device: MNEMOSYNE_TORCH_PROFILE=DIR[:FIRST[:COUNT[:OPTION…]]] profiles steps FIRST..FIRST+COUNT-1
(default 50, 10) and writes DIR/rank<R>.txt: kernels by total device time, with the window's wall
time and device-busy time per step. FIRST as `@N` opens the window at the first step that holds a
chunk starting at token N or later (a long prompt's later chunks, wherever in a run they fall).
Options: `trace`, also DIR/rank<R>.json, a Chrome trace (tens of MB and minutes to write for a
window of large steps, so it is opt-in); `cuda`, device activity only, so that the profiler's own
host cost per operator does not lengthen a launch-bound step. A later engine of the same process
writes rank<R>-1, rank<R>-2, … Off when the variable is unset."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mnemosyne.plan import StepPlan

ENV = "MNEMOSYNE_TORCH_PROFILE"


def allocator_counters(device: torch.device) -> dict[str, float]:
    """Counters of torch's device and pinned-host allocators whose growth over a window of steps means
    host time, or a wait, in the launches: cudaMalloc calls, retries after one failed (cached blocks
    freed, which waits for the device), new pinned blocks (cudaHostAlloc) and their time in ms."""
    if device.type != "cuda":
        return {}
    stats, host = torch.cuda.memory_stats(device), torch.cuda.host_memory_stats()
    return {"cudaMalloc": stats.get("num_device_alloc", 0), "cudaFree": stats.get("num_device_free", 0),
            "malloc retries": stats.get("num_alloc_retries", 0), "pinned blocks": host.get("num_host_alloc", 0),
            "pinning ms": host.get("host_alloc_time.total", 0) / 1e3}


class StepProfiler:
    def __init__(self, rank: int, device: torch.device, spec: str | None = None):
        spec = os.environ.get(ENV) if spec is None else spec
        self.rank, self.device = rank, device
        self._profiler: torch.profiler.profile | None = None
        self._step = 0
        if not spec:
            self.out_dir = None
            return
        directory, *fields = spec.split(":")
        self.out_dir = Path(directory)
        first = fields[0] if fields else "50"
        self.min_start = int(first[1:]) if first.startswith("@") else None
        """Open at the first step with a chunk starting at this token or later (FIRST as `@N`)."""
        self.first = 0 if self.min_start is not None else int(first)
        self.count = int(fields[1]) if len(fields) > 1 else 10
        options = set(fields[2:])
        if options - {"trace", "cuda"}:
            raise ValueError(f"{ENV}: unknown option(s) {sorted(options - {'trace', 'cuda'})}; known: trace, cuda")
        self.trace = "trace" in options
        self.device_only = "cuda" in options and device.type == "cuda"

    def before_step(self, plan: StepPlan | None = None) -> None:
        if self.out_dir is None:
            return
        if self.min_start is not None:
            if plan is None or all(c.start < self.min_start for c in plan.chunks):
                return
            self.first, self.min_start = self._step, None  # the trigger: the window opens here
        if self._step != self.first:
            return
        activities = [] if self.device_only else [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._allocators = allocator_counters(self.device)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._start_s = time.perf_counter()

    def after_step(self) -> None:
        self._step += 1
        if self._profiler is not None and self._step == self.first + self.count:
            self._write(self.count)

    def close(self) -> None:
        """The worker is stopping: a window still open (it reached past the run's last step) is
        written with the steps it saw, rather than left to the profiler's teardown at exit (a
        segmentation fault on an H200, with nothing written: benchmarks/jobs/call37.txt)."""
        if self._profiler is not None:
            self._write(self._step - self.first, cut_short=True)

    def _write(self, num_steps: int, cut_short: bool = False) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_s = time.perf_counter() - self._start_s
        self._profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name, n = f"rank{self.rank}", 1
        while (self.out_dir / f"{name}.txt").exists():  # a second engine in the same run
            name, n = f"rank{self.rank}-{n}", n + 1
        if self.trace:
            self._profiler.export_chrome_trace(str(self.out_dir / f"{name}.json"))
        events = self._profiler.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        is_cuda = self.device.type == "cuda"
        table = events.table(sort_by="self_device_time_total" if is_cuda else "self_cpu_time_total", row_limit=25)
        if is_cuda and not self.device_only:  # the host's side too: operators and CUDA runtime calls
            table += "\n\nBy host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=25)
        per = max(1, num_steps)
        note = f" (the window of {self.count} was cut short when the worker stopped)" if cut_short else ""
        counters = allocator_counters(self.device)
        allocators = ", ".join(f"{k} {counters[k] - self._allocators[k]:g}" for k in counters)
        (self.out_dir / f"{name}.txt").write_text(
            f"{num_steps} steps{note}: wall {wall_s * 1e3 / per:.3f} ms/step, device busy (sum of kernel "
            f"times) {device_us / 1e3 / per:.3f} ms/step\n"
            f"{'allocators over the window: ' + allocators if allocators else ''}\n{table}\n")
        self._profiler = None
