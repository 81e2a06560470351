"""NVML read in the background while a benchmark runs, on the GPUs this process sees."""

from __future__ import annotations

import os
import threading
from typing import Any


def visible_handles() -> tuple[Any, list[Any]]:
    """(pynvml, the NVML handles of the GPUs this process sees, in CUDA's order): NVML numbers GPUs
    physically, CUDA_VISIBLE_DEVICES (as benchmarks/gpu_jobs.py sets it) picks and orders them."""
    import pynvml

    pynvml.nvmlInit()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [int(i) for i in visible.split(",")] if visible else range(pynvml.nvmlDeviceGetCount())
    return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in ids]


class Poller:
    """Calls `sample()` every period_s on a thread of its own, from `start()` until `stop()`."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()
