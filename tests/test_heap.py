"""Freezing a serving process's start-up heap out of the garbage collector's reach."""

from __future__ import annotations

import gc
import logging

import pytest

from mnemosyne import heap
from mnemosyne.heap import WARNING_INTERVAL_S, GcPauseWatch, freeze_startup_heap, watch_gc_pauses


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_what_start_up_built_is_frozen_and_later_garbage_is_still_collected():
    kept = [_Node() for _ in range(100)]
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(kept)
        assert all(not any(o is k for o in gc.get_objects()) for k in kept[:3])  # out of the collector's lists
        later = _Node()
        del later
        assert gc.collect() >= 1  # a cycle made after the freeze is found and freed
    finally:
        gc.unfreeze()


@pytest.fixture(autouse=True)
def _no_watch_left_behind():
    """The process-wide watch that freeze_startup_heap installs is taken out again after each test."""
    yield
    if heap._watch is not None:
        gc.callbacks.remove(heap._watch)
        heap._watch = None


def test_mnemosyne_gc_freeze_0_leaves_the_heap_unfrozen(monkeypatch):
    monkeypatch.setenv("MNEMOSYNE_GC_FREEZE", "0")
    assert freeze_startup_heap() == 0
    assert gc.get_freeze_count() == 0


def test_a_long_collection_is_logged_once_per_interval(caplog):
    now = [0.0]
    watch = GcPauseWatch(threshold_s=0.02, clock=lambda: now[0])

    def collection(took_s: float) -> None:
        watch("start", {"generation": 2})
        now[0] += took_s
        watch("stop", {"generation": 2, "collected": 5})
        now[0] += 1.0

    with caplog.at_level(logging.WARNING, logger="mnemosyne.heap"):
        collection(0.005)  # short: not logged
        collection(0.074)
        collection(0.030)  # within the interval: counted, not logged
        now[0] += WARNING_INTERVAL_S
        collection(0.040)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "generation 2 paused this process for 74.0 ms" in warnings[0]
    assert "40.0 ms" in warnings[1] and "2 such pauses" in warnings[1]
    assert watch.longest_s == pytest.approx(0.074)


def test_the_watch_is_installed_once():
    assert watch_gc_pauses() is watch_gc_pauses()
    assert sum(callback is watch_gc_pauses() for callback in gc.callbacks) == 1
