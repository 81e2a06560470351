"""benchmarks/nvml.py's Poller, which the benchmarks' NVML samplers (memory peaks, clocks and power)
run on: it samples on its own thread from start() until stop(), and starts again after a stop."""

from __future__ import annotations

import time

from benchmarks.nvml import Poller


class Counter(Poller):
    def __init__(self):
        super().__init__(period_s=0.001)
        self.count = 0

    def sample(self) -> None:
        self.count += 1


def test_samples_between_start_and_stop_only():
    poller = Counter()
    time.sleep(0.02)
    assert poller.count == 0  # not started
    poller.start()
    time.sleep(0.05)
    poller.stop()
    stopped_at = poller.count
    assert stopped_at > 0
    time.sleep(0.02)
    assert poller.count == stopped_at
    poller.start()  # as ClockSampler does for each `with`
    time.sleep(0.05)
    poller.stop()
    assert poller.count > stopped_at
