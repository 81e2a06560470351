"""With KV parallelism every KV replica's output rank replies for the requests that replica samples;
the engine sees one result per step, once every replica has replied."""

from __future__ import annotations

from typing import TypeVar

from mnemosyne.plan import StepResult

Event = TypeVar("Event")


class ReplicaResults:
    """Joins the per-replica parts of each step's result. Replicas run steps in order, so steps
    complete in order too."""

    def __init__(self, num_replicas: int):
        self.num_replicas = num_replicas
        self._parts: dict[int, list[StepResult]] = {}

    def add(self, events: list[Event]) -> list[Event | StepResult]:
        """The events with each step's result parts replaced by one merged result, once complete."""
        if self.num_replicas == 1:
            return events
        out: list[Event | StepResult] = []
        for event in events:
            if not isinstance(event, StepResult):
                out.append(event)
                continue
            parts = self._parts.setdefault(event.step_id, [])
            parts.append(event)
            if len(parts) == self.num_replicas:
                del self._parts[event.step_id]
                out.append(StepResult(event.step_id, sum((p.request_ids for p in parts), ()),
                                      sum((p.token_ids for p in parts), ()), sum((p.logprobs for p in parts), ())))
        return out
