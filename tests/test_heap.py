"""Freezing a serving process's start-up heap out of the garbage collector's reach."""

from __future__ import annotations

import gc

from mnemosyne.heap import freeze_startup_heap


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
