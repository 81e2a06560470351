"""Online correction of the step-time model. Adaptive chunking sizes each step to fit the TBT budget
by predicted time; on a real device, steps that mix decodes with prefill chunks ran longer than the
profile predicts (host time, launches, kernels at shapes between the profile's grid points), and a
step sized to the budget then misses it about half the time. The engine reports each such step's
measured time; the budget is divided by a high quantile of measured / predicted over recent steps,
so that most steps land within it. In the simulator, measured is predicted and the factor stays 1."""

from __future__ import annotations

from collections import deque

WINDOW = 256
"""Recent steps whose ratios the factor is taken over."""
QUANTILE = 0.95
"""The ratio this fraction of recent steps stay under: most steps then fit the budget, and a rare
stall (a kernel compiled mid-serving) moves nothing. The 99th percentile after 100 steps measured
worse on an H200 (call33: p99 TBT 59.7 ms against 51.2 ms with these settings in call32): the steps
before the factor departs from 1 run over the budget, and they set p99."""
MIN_STEPS = 64
"""Steps observed before the factor departs from 1: enough that the quantile passes over a few stalls
(with 16, QUANTILE's index was the largest ratio, and one cuDNN compile in a run's first steps took
the factor to its bound)."""
NEAR_BUDGET = 0.5
"""Only steps predicted at this share of the budget in force (the TBT budget over the factor) or more
are observed: the budget limits those, and a small step's ratio is mostly fixed host time. In call27
(an H200) steps predicted at 3-25 ms ran up to 3x over; counted, they took the factor to 3.3 in the
run's first seconds, when the window was short, and the chunks of short prompts that arrived then
shrank with it."""
BOUNDS = (0.5, 4.0)
"""The factor's range: a model off by more than this is a wrong profile, not something to chase."""


class StepTimeFeedback:
    def __init__(self, window: int = WINDOW, quantile: float = QUANTILE, min_steps: int = MIN_STEPS):
        self._ratios: deque[float] = deque(maxlen=window)
        self.quantile = quantile
        self.min_steps = min_steps
        self.factor = 1.0
        """measured / predicted that QUANTILE of recent steps stay under (1 until MIN_STEPS)."""

    @property
    def num_observed(self) -> int:
        """Steps in the window."""
        return len(self._ratios)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """A finished step that held a prefill chunk: its predicted and measured seconds."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        self._ratios.append(measured_s / predicted_s)
        if len(self._ratios) >= self.min_steps:
            ordered = sorted(self._ratios)
            ratio = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            self.factor = min(BOUNDS[1], max(BOUNDS[0], ratio))
