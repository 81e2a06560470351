"""World size 1: the worker lives in the engine's process. Simple to debug, no serialization."""

from __future__ import annotations

import gc
import time
from collections import deque

import torch

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.executor.worker import RuntimeInfo, Worker
from mnemosyne.models.loaders import ModelLoader
from mnemosyne.plan import StageDone, StepEvent, StepPlan, StepResult
from mnemosyne.runner.model_runner import PendingStep

_POLL_S = 0.0002
"""How often `wait_events` with a timeout looks at the oldest step's kernels."""


class InProcessExecutor:
    num_stages = 1

    def __init__(self, config: EngineConfig, model_config: ModelConfig, loader: ModelLoader):
        self.worker = Worker(config, model_config, loader)
        self._info = self.worker.info
        self._is_timed = config.trace_file is not None
        self._events: deque[StepEvent | PendingStep] = deque()

    @property
    def info(self) -> RuntimeInfo:
        return self._info

    @property
    def worker_infos(self) -> dict[int, RuntimeInfo]:
        """Global rank -> what that worker found at start-up."""
        return {0: self._info}

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def submit(self, plan: StepPlan) -> None:
        """Queue the plan's work on the device; `wait_events` brings its result."""
        start_s = time.time()
        step = self.worker.launch(plan)
        if self._is_timed:
            if self.worker.device.type == "cuda":
                torch.cuda.synchronize(self.worker.device)
            self._events.append(StageDone(plan.step_id, 0, 0, start_s, time.time()))
        self._events.append(step)

    def wait_events(self, timeout_s: float | None = None) -> list[StepEvent]:
        """The oldest submitted step's events, its result last: waits for that step's kernels only, so
        a step queued behind it keeps the device busy meanwhile; none if they have not run within
        timeout_s (None: no limit)."""
        if timeout_s is not None:
            oldest = next((e for e in self._events if isinstance(e, PendingStep)), None)
            deadline = time.monotonic() + timeout_s
            while oldest is not None and not oldest.is_done():
                if time.monotonic() >= deadline:
                    return []
                time.sleep(_POLL_S)
        events = []
        while self._events:
            event = self._events.popleft()
            if isinstance(event, PendingStep):
                events.append(event.result())
                break
            events.append(event)
        return events

    def shutdown(self) -> None:
        """Free the weights, the KV cache and the CUDA graphs now, so that the next engine in this
        process (a benchmark's second run) gets the memory back."""
        if self.worker is None:
            return
        self.worker.close()
        device, self.worker = self.worker.device, None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
