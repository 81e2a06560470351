"""Scheduling policies: the order in which requests get the step's token budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mnemosyne.request import Request


class Policy(Protocol):
    def order(self, requests: Iterable[Request], now_s: float) -> list[Request]:
        """Requests from most to least urgent. Pure: mutates nothing."""
        ...


class FCFS:
    """First come, first served: earliest arrival first."""

    def order(self, requests: Iterable[Request], now_s: float) -> list[Request]:
        return sorted(requests, key=lambda r: r.metrics.arrival_s)


POLICIES = {"fcfs": FCFS}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"--scheduler must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]()
