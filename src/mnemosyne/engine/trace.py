"""--trace-file: a Chrome-trace JSON (open it in Perfetto or chrome://tracing) with one track per
(kvp replica, pipeline stage) and one slice per micro-batch, timed on the workers themselves."""

from __future__ import annotations

import json
from pathlib import Path

from mnemosyne.plan import StageDone, StepPlan

_MAX_LABELLED_CHUNKS = 4
"""A slice's name lists this many chunks; its args list them all."""


class PipelineTrace:
    """Collects the workers' stage timings (`StageDone`) and the plans' contents; `write` saves them.
    `num_tracks` is how many reports each step gets (kvp × pp)."""

    def __init__(self, path: str | Path, num_tracks: int):
        self.path = Path(path)
        self.num_tracks = num_tracks
        self._plans: dict[int, tuple[str, dict[str, object]]] = {}
        """Step id -> (slice name, slice args)."""
        self._timings: list[StageDone] = []
        self._num_reports: dict[int, int] = {}

    def add_plan(self, plan: StepPlan) -> None:
        chunks = [f"{c.request_id}:{c.num_new_tokens}" for c in plan.chunks]
        name = " ".join(chunks[:_MAX_LABELLED_CHUNKS])
        if len(chunks) > _MAX_LABELLED_CHUNKS:
            name += f" +{len(chunks) - _MAX_LABELLED_CHUNKS} more"
        args = {"step_id": plan.step_id, "num_tokens": plan.num_tokens,
                "request_ids": [c.request_id for c in plan.chunks],
                "starts": [c.start for c in plan.chunks],
                "num_new_tokens": [c.num_new_tokens for c in plan.chunks]}
        self._plans[plan.step_id] = (name, args)
        self._num_reports[plan.step_id] = 0

    def record(self, done: StageDone) -> None:
        self._timings.append(done)
        self._num_reports[done.step_id] = self._num_reports.get(done.step_id, 0) + 1

    @property
    def is_complete(self) -> bool:
        """Every submitted step has a report from every track."""
        return all(n >= self.num_tracks for n in self._num_reports.values())

    def events(self) -> list[dict[str, object]]:
        """Chrome trace events: metadata naming the tracks, then one complete ("X") event per report."""
        if not self._timings:
            return []
        origin_s = min(t.start_s for t in self._timings)
        tracks = sorted({(t.kvp_rank, t.pp_rank) for t in self._timings})
        events: list[dict[str, object]] = []
        for kvp_rank in sorted({k for k, _ in tracks}):
            events.append({"ph": "M", "name": "process_name", "pid": kvp_rank, "args": {"name": f"kvp {kvp_rank}"}})
        for kvp_rank, pp_rank in tracks:
            events.append({"ph": "M", "name": "thread_name", "pid": kvp_rank, "tid": pp_rank,
                           "args": {"name": f"stage {pp_rank}"}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": kvp_rank, "tid": pp_rank,
                           "args": {"sort_index": pp_rank}})
        for t in sorted(self._timings, key=lambda t: (t.kvp_rank, t.pp_rank, t.start_s)):
            name, args = self._plans.get(t.step_id, (f"step {t.step_id}", {"step_id": t.step_id}))
            events.append({"ph": "X", "name": name, "cat": "micro-batch", "pid": t.kvp_rank, "tid": t.pp_rank,
                           "ts": round((t.start_s - origin_s) * 1e6, 1),
                           "dur": round((t.end_s - t.start_s) * 1e6, 1), "args": args})
        return events

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}, indent=1) + "\n")
