"""Launching a step never waits for the device (#8: no `.item()` or host sync in the step). Each
launch of a mixed serving workload (new prompts on both chunk kernels, chunks over prefixes, decodes
eager and as CUDA graphs, sampling with temperature, top-k/top-p and logprobs) runs behind a kernel
that keeps the device busy for about 200 ms, and under torch's sync debug mode: every synchronising
torch call is named where it is made, and any other wait (a pageable copy the driver stages behind the
stream, say) shows as the busy kernel having finished when the launch returned."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mnemosyne.bench.floors import busy_cycles
from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams

BUSY_MS = 200.0

PROMPT_LENGTHS = (9, 300, 40, 700, 17, 130, 1, 64)
ARRIVAL_STEPS = (0, 0, 1, 3, 6, 9, 12, 14)


def _params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return SamplingParams(max_tokens=12, ignore_eos=True)  # greedy
    if i % 3 == 1:
        return SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i, logprobs=2)
    return SamplingParams(max_tokens=14, ignore_eos=True, temperature=1.0, top_k=20, seed=i)


def _run(engine: LLMEngine, salt: int) -> None:
    """The workload; another salt gives other prompts of the same lengths (the prefix cache holds the
    first run's, and would leave only their last tokens to compute)."""
    prompts = [[(13 * i + 7 * j + salt) % 500 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    step = 0
    while step <= max(ARRIVAL_STEPS) or engine.has_unfinished_requests():
        for i, at in enumerate(ARRIVAL_STEPS):
            if at == step:
                engine.add_request(prompts[i], _params(i))
        engine.step()
        step += 1


@pytest.mark.gpu
def test_a_launch_never_waits_for_the_device(monkeypatch):
    from mnemosyne.attention import gpu

    # serving's cuDNN path (ragged plans) and steps planned ahead with their chunks, with the Triton
    # split lowered so that both chunk kernels see new prompts and chunks over a prefix; no TBT SLO,
    # which the busy kernels would break, shrinking every chunk
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cuda", kv_cache_memory=0.05, seed=0,
                                    max_num_batched_tokens=256, cudnn_ragged=True, triton_chunk_rows=128,
                                    async_prefill=True))
    try:
        _run(engine, 0)  # first: every kernel compiled and tuned, every plan built
        routes = {"triton": 0, "cudnn": 0}
        for name, route in (("paged_chunks", "triton"), ("chunk_attention", "cudnn")):
            original = getattr(gpu, name)

            def counted(*args, _original=original, _route=route, **kwargs):
                routes[_route] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(gpu, name, counted)
        runner = engine.executor.worker.runner
        launch, cycles, waited, kinds, syncs = runner.launch, busy_cycles(BUSY_MS), [], set(), set()

        def guarded(plan):
            torch.cuda._sleep(cycles)
            busy = torch.cuda.Event()
            busy.record()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    step = launch(plan)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            syncs.update(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
            kind = ("decode" if all(c.num_new_tokens == 1 for c in plan.chunks) else "chunks",
                    bool(plan.new_requests))
            kinds.add(kind)
            if busy.query():
                waited.append((plan.step_id, kind))
            return step

        runner.launch = guarded
        _run(engine, 1)
        assert not syncs, f"synchronising torch calls in a launch: {sorted(syncs)}"
        assert not waited, f"launches that waited for the device (step, (kind, with new requests)): {waited}"
        assert routes["triton"] > 0 and routes["cudnn"] > 0, routes
        assert {("decode", False), ("chunks", True), ("chunks", False)} <= kinds, kinds
    finally:
        engine.shutdown()
