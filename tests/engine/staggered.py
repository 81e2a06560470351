"""Requests that arrive while others run: the driver shared by the exactness tests."""

from __future__ import annotations

from collections.abc import Sequence

from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.outputs import RequestOutput
from mnemosyne.request import SamplingParams


def run_staggered(engine: LLMEngine, prompts: Sequence[list[int]], arrival_steps: Sequence[int],
                  params: SamplingParams) -> list[RequestOutput]:
    """Add prompt i at engine step arrival_steps[i]; run to completion; final outputs in prompt order."""
    done: dict[str, RequestOutput] = {}
    ids = [""] * len(prompts)
    step = 0
    while step <= max(arrival_steps) or engine.has_unfinished_requests():
        for i, at in enumerate(arrival_steps):
            if at == step:
                ids[i] = engine.add_request(prompts[i], params)
        done.update((out.request_id, out) for out in engine.step() if out.finished)
        step += 1
    return [done[i] for i in ids]
