"""The garbage collector in a serving process: what start-up built (a model's modules, torch, the
tokenizer, the web framework: about 170,000 tracked objects in an engine on the development box) lives
as long as the process, yet every full collection walks all of it. In an engine stepping chat traffic
(dummy:tiny on two CPU cores, `LLM` in-process, 40 s: `benchmarks/gc_pauses.py`) one full collection
took 74-92 ms (two runs), a pause that every streaming request sees as a gap between its tokens; with
the start-up heap frozen out of the collector's reach, none came in the same 40 s and about 1,500
objects were tracked. Serving on an H200 (call69, 80 s of mixed traffic), the unfrozen engine core and
API process each had one full collection of 78-86 ms while serving; frozen, none. Each serving
process (engine core, API, workers) calls `freeze_startup_heap` once it is ready, which also starts
logging any collection that pauses the process for long (`watch_gc_pauses`). `MNEMOSYNE_GC_FREEZE=0`
leaves the heap unfrozen, to measure what freezing buys."""

from __future__ import annotations

import gc
import logging
import os
import time

logger = logging.getLogger(__name__)

PAUSE_WARNING_S = 0.02
"""A collection this long or longer is logged: 40% of a 50 ms TBT SLO."""
WARNING_INTERVAL_S = 10.0
"""At most one such warning this often (the pauses in between are counted in the next)."""


def freeze_startup_heap() -> int:
    """Collect once, then move every object that survived into the permanent generation, which the
    collector never scans (`gc.freeze`); returns how many were frozen (0 with MNEMOSYNE_GC_FREEZE=0).
    Objects created later are collected as usual. Either way, long collections are logged from now on
    (not this first one, which comes before serving)."""
    if os.environ.get("MNEMOSYNE_GC_FREEZE", "1") != "0":
        gc.collect()
        gc.freeze()
    watch_gc_pauses()
    return gc.get_freeze_count()


class GcPauseWatch:
    """A `gc.callbacks` entry that times each collection and warns about those of PAUSE_WARNING_S or
    more (rate-limited), with the generation, what it freed, and how many came since the last warning."""

    def __init__(self, threshold_s: float = PAUSE_WARNING_S, clock=time.perf_counter):
        self.threshold_s = threshold_s
        self._clock = clock
        self._started_s: float | None = None
        self._warned_s: float | None = None
        self.num_long = 0
        """Long collections since the last warning."""
        self.longest_s = 0.0
        """The longest collection seen."""

    def __call__(self, phase: str, info: dict) -> None:
        now_s = self._clock()
        if phase == "start":
            self._started_s = now_s
            return
        if self._started_s is None:
            return
        took_s, self._started_s = now_s - self._started_s, None
        self.longest_s = max(self.longest_s, took_s)
        if took_s < self.threshold_s:
            return
        self.num_long += 1
        if self._warned_s is not None and now_s - self._warned_s < WARNING_INTERVAL_S:
            return
        logger.warning("a garbage collection of generation %d paused this process for %.1f ms (%d collected; "
                       "%d such pauses since the last warning)", info.get("generation", -1), 1e3 * took_s,
                       info.get("collected", 0), self.num_long)
        self._warned_s, self.num_long = now_s, 0


_watch: GcPauseWatch | None = None


def watch_gc_pauses() -> GcPauseWatch:
    """Install the process's GcPauseWatch once; returns it."""
    global _watch
    if _watch is None:
        _watch = GcPauseWatch()
        gc.callbacks.append(_watch)
    return _watch
