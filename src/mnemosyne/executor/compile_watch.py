"""Triton compiles after a worker's warm-up, each logged as a warning with its kernel, its
specialization and how long it took.

Triton compiles a kernel once per process for every new specialization of its arguments (dtypes,
the 16-byte alignment of pointers, integers equal to 1 or divisible by 16, constexprs) and the
autotuner times every configuration of a new key. The warm-up means to meet all of them before the
first request; one it missed costs a step the compile, up to seconds on a machine whose Triton
cache is cold, in the middle of serving. This makes such a step name its cause."""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class CompileWatch:
    """Times every Triton compile in this process (a load from Triton's on-disk cache counts too);
    once `arm`ed, a compile is a warning. Hooks already installed keep being called."""

    def __init__(self) -> None:
        self.armed = False
        self.compiles = 0
        """Compiles since `arm`."""
        self.seconds = 0.0
        """Their time in all."""
        self._started: float | None = None
        self._previous: tuple[Any, Any] = (None, None)

    def install(self) -> CompileWatch:
        from triton import knobs

        self._previous = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after
        return self

    def arm(self) -> None:
        """Start-up is over: from now on, a compile stalls a step."""
        self.armed = True

    def _before(self, **kwargs: Any) -> bool | None:
        self._started = time.perf_counter()
        previous = self._previous[0]
        return previous(**kwargs) if previous is not None else None  # a true result skips the compile

    def _after(self, **kwargs: Any) -> None:
        seconds = time.perf_counter() - self._started if self._started is not None else 0.0
        self._started = None
        if self.armed:
            self.compiles += 1
            self.seconds += seconds
            logger.warning("Triton compiled %s after warm-up (%.2f s, %d so far, %.1f s in all): %s",
                           kwargs["fn"].name, seconds, self.compiles, self.seconds, kwargs["repr"])
        previous = self._previous[1]
        if previous is not None:
            previous(**kwargs)
