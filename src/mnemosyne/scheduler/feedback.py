"""Online correction of the step-time model. Adaptive chunking sizes each step to fit the TBT budget
by predicted time; on a real device, steps that mix decodes with prefill chunks ran longer than the
profile predicts (host time, launches, kernels at shapes between the profile's grid points), and a
step sized to the budget then misses it about half the time. The engine reports each such step's
measured time; the budget is divided by a high quantile of measured / predicted over recent steps,
so that most steps land within it. Until it has observations of its own, the factor is the same
quantile of the profile's own check (`Profile.check_ratios`): a real run's first steps were its
slowest against the budget (call31-call33, an H200: 15-20 steps of 50-66 ms in the first 4-5 s, with
the factor still at 1). In the simulator, measured is predicted and the factor goes to 1."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from mnemosyne.config import TBT_SLO_QUANTILE

WINDOW = 256
"""Recent steps whose ratios the factor is taken over."""
QUANTILE = TBT_SLO_QUANTILE
"""The ratio this fraction of recent steps stay under (the default of --tbt-slo-quantile, 0.995). A TBT
SLO is judged at p99 over tokens, and the steps near the budget carry more decodes than the average
step: with 99% of those steps sized to fit, the decodes' own p99 was 49.5-50.8 ms and the clients'
50.6-51.3 ms in five one-GPU runs of six (call98-99, `serve_mixed.sh 1gpu`, two H200s side by side).
At 0.995 the clients' p99 was 49.2 and 49.3 ms in two runs of two, for long prompts 15% slower
(46.2-47.1 s against 39.5-41.3 s) and short p99 TTFT 0.109 s against 0.116-0.117 s. Earlier (call44),
0.95 gave 56.1 and 56.8 ms and 0.99 48.4 ms. A rare stall (a kernel compiled mid-serving) still moves
nothing: over a full window the factor is the third largest of 256 ratios, over the first MIN_STEPS
the second largest. (call33 measured 0.99
worse, 59.7 ms against 51.2, when the factor started at 1 and waited 100 steps: those first steps ran
over the budget and set p99. It now starts from the profile's check.)"""
MIN_STEPS = 16
"""Steps observed before the factor is taken from them alone (before: the prior). The quantile's rank
over n ratios is QUANTILE × (n - 1), so the largest of 16 is passed over: one stall moves nothing. With
64 (and the prior at 1) the factor first moved 3.9 s into call32's run, and those seconds held most of
its steps over the budget. (Serving engines now build their cuDNN plans at start-up, so the compile
that once took the factor to its bound in a run's first steps no longer happens.)"""
NEAR_BUDGET = 0.5
"""Only steps predicted at this share of the budget in force (the TBT budget over the factor) or more
are observed: the budget limits those, and a small step's ratio is mostly fixed host time. In call27
(an H200) steps predicted at 3-25 ms ran up to 3x over; counted, they took the factor to 3.3 in the
run's first seconds, when the window was short, and the chunks of short prompts that arrived then
shrank with it."""
BOUNDS = (0.5, 4.0)
"""The factor's range: a model off by more than this is a wrong profile, not something to chase."""
STALL_WARNING_S = 10.0
"""At most one warning this often about steps that ran over BOUNDS[1] times their prediction, and one
about a high factor."""
HIGH_FACTOR = 2.0
"""A factor from which on steps are sized to half the budget or less: warned about, with the ratios that
set it. Three one-GPU servers of eight with a 40 ms budget stalled (call63-65: steps of about 17 ms,
short prompts waiting 10-100 s) and the first two left nothing in their logs to tell why; call65's
logged a correction of 2.16 after 23 steps."""

logger = logging.getLogger(__name__)


def judged_ratio(predicted_s: float, measured_s: float, near_s: float) -> float:
    """measured / predicted, but a step predicted under near_s (NEAR_BUDGET of the raw budget) counts as
    slow only by how far it ran past near_s. Such a step fits the budget whatever its ratio, and its
    excess is mostly fixed time (host, launches, a KVP gather), which smaller chunks do not remove: as
    a plain ratio it grew as the chunks shrank, and the factor ran to its bound. A kvp=4 serving run
    (call56) sat there from its 51st second: steps of 8-15 ms, nearly all decodes, and short prompts
    waiting up to a minute. Judged so, a step whose excess is c stays under 1 + c / near_s."""
    ratio = measured_s / predicted_s
    if predicted_s >= near_s:
        return ratio
    return min(ratio, max(1.0, measured_s / near_s))


def ratio_quantile(ratios: Sequence[float], quantile: float = QUANTILE) -> float:
    """The ratio at rank quantile × (n - 1) of the sorted ratios, within BOUNDS (1 for none)."""
    if not ratios:
        return 1.0
    ordered = sorted(ratios)
    return min(BOUNDS[1], max(BOUNDS[0], ordered[int(quantile * (len(ordered) - 1))]))


class StepTimeFeedback:
    def __init__(self, window: int = WINDOW, quantile: float = QUANTILE, min_steps: int = MIN_STEPS,
                 prior: Sequence[float] = (), clock: Callable[[], float] = time.monotonic):
        self._ratios: deque[float] = deque(maxlen=window)
        self._clock = clock
        self._stalls = 0
        """Steps over BOUNDS[1] times their prediction since the last warning."""
        self._warned_s: float | None = None
        self._high_warned_s: float | None = None
        self.quantile = quantile
        self.min_steps = min_steps
        self.factor = ratio_quantile(prior, quantile)
        """measured / predicted that QUANTILE of recent steps stay under; until MIN_STEPS, of the
        prior's ratios (measured / predicted of the profile's held-out batches), 1 without one."""

    @property
    def typical(self) -> float:
        """The median measured / predicted ratio of recent steps (1 until MIN_STEPS): how long a step is
        expected to take, where `factor` is how long nearly all of them may take."""
        return ratio_quantile(self._ratios, 0.5) if len(self._ratios) >= self.min_steps else 1.0

    @property
    def num_observed(self) -> int:
        """Steps in the window."""
        return len(self._ratios)

    def observe(self, predicted_s: float, measured_s: float, near_s: float = 0.0) -> None:
        """A finished step that held a prefill chunk: its predicted and measured seconds; near_s, the
        prediction under which a step's ratio is judged by `judged_ratio`."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        if measured_s > BOUNDS[1] * predicted_s:
            self._warn_stall(predicted_s, measured_s)
        self._ratios.append(judged_ratio(predicted_s, measured_s, near_s))
        if len(self._ratios) >= self.min_steps:
            self.factor = ratio_quantile(self._ratios, self.quantile)
            if self.factor >= HIGH_FACTOR:
                self._warn_high()

    def _warn_high(self) -> None:
        now_s = self._clock()
        if self._high_warned_s is not None and now_s - self._high_warned_s < STALL_WARNING_S:
            return
        self._high_warned_s = now_s
        top = sorted(self._ratios)[int(self.quantile * (len(self._ratios) - 1)):]
        logger.warning("the step budget's correction is %.2f: steps are sized to %.0f%% of the TBT budget; the "
                       "highest measured/predicted ratios of the last %d steps with a prefill chunk: %s",
                       self.factor, 100 / self.factor, len(self._ratios), ", ".join(f"{r:.2f}" for r in top[-8:]))

    def _warn_stall(self, predicted_s: float, measured_s: float) -> None:
        # Such a step is no model error but a stall (a kernel compiled mid-serving, a pause on the
        # host): the budget cannot size it away, and a few of them in a window raise the factor for
        # the steps after. Worth seeing in the server's log; rate-limited.
        self._stalls += 1
        now_s = self._clock()
        if self._warned_s is not None and now_s - self._warned_s < STALL_WARNING_S:
            return
        logger.warning("a step predicted at %.1f ms took %.1f ms (%d such steps since the last warning); the "
                       "step budget's correction is now %.2f", 1e3 * predicted_s, 1e3 * measured_s, self._stalls,
                       self.factor)
        self._warned_s, self._stalls = now_s, 0
