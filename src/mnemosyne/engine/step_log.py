"""--step-log FILE: one JSON line per step as the engine core landed it: when, what it held, its
predicted and measured time, and the step budget's correction then. Cheap enough for a serving run
(a buffered line per step), and what the server's histograms cannot show: which steps ran over the
budget, and what they held."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mnemosyne.plan import StepPlan


class StepLog:
    def __init__(self, path: str | Path, clock=time.monotonic):
        self._clock = clock
        self._start_s = clock()
        self._file = open(path, "w", buffering=1 << 16)  # noqa: SIM115 (closed by close())

    def record(self, plan: StepPlan, measured_s: float | None, predicted_s: float | None,
               factor: float | None, launch_s: float | None = None, queued: bool | None = None) -> None:
        """A landed step. measured_s: its time, since the step before it landed (`LLMEngine._step_times`;
        None where steps overlap); predicted_s: the step-time model's (None without one); factor: the
        correction the budget was divided by when the next step was sized; launch_s: how long planning
        and launching it held the engine's thread; queued: whether it was launched while another step
        was in flight (planned ahead)."""
        chunks = [[c.request_id, c.start, c.num_new_tokens] for c in plan.chunks if c.num_new_tokens > 1]
        line = {"t_s": round(self._clock() - self._start_s, 4), "step": plan.step_id,
                "decodes": sum(c.num_new_tokens == 1 for c in plan.chunks), "chunks": chunks,
                "predicted_ms": None if predicted_s is None else round(1e3 * predicted_s, 3),
                "measured_ms": None if measured_s is None else round(1e3 * measured_s, 3),
                "factor": None if factor is None else round(factor, 4),
                "launch_ms": None if launch_s is None else round(1e3 * launch_s, 3), "queued": queued}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
