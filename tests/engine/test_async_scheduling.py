"""Async scheduling plans each step while the previous one runs: decodes take their tokens from that
step's samples on the device, and (--async-prefill) prompt chunks and new requests join them. The
outputs must be those of the synchronous engine, token for token, whatever ends the requests (length, a
stop token, a stop while a step ahead is in flight) and however they sample; only when the plans are
made changes."""

from __future__ import annotations

import time

import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams

PROMPTS = [[(5 * i + 3 * j) % 300 + 3 for j in range(n)] for i, n in enumerate((9, 33, 1, 70, 17))]
ARRIVAL_STEPS = [0, 0, 2, 5, 30]


def _engine(is_async: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_memory=0.01,
                                  max_num_batched_tokens=32, seed=0, async_scheduling=is_async))


def _run(engine: LLMEngine, params: list[SamplingParams]) -> tuple[list[tuple], int]:
    """(token ids, finish reason, logprobs) per prompt, and how many steps were planned ahead."""
    schedule, ahead_ids = engine.scheduler.schedule, []

    def recording(ahead: bool = False):
        plan = schedule(ahead)
        if ahead and plan.chunks:
            ahead_ids.append(plan.step_id)
            engine.num_prefill_ahead += any(c.num_new_tokens > 1 for c in plan.chunks)  # type: ignore[attr-defined]
        return plan

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    engine.num_prefill_ahead = 0  # type: ignore[attr-defined]
    done, ids, step = {}, [""] * len(PROMPTS), 0
    while step <= max(ARRIVAL_STEPS) or engine.has_unfinished_requests():
        for i, at in enumerate(ARRIVAL_STEPS):
            if at == step:
                ids[i] = engine.add_request(PROMPTS[i], params[i], request_id=f"r{i}")
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    outs = [done[i].outputs[0] for i in ids]
    return [(o.token_ids, o.finish_reason, o.logprobs) for o in outs], len(ahead_ids)


@pytest.fixture(scope="module")
def engines():
    sync, async_ = _engine(False), _engine(True)
    yield sync, async_
    sync.shutdown()
    async_.shutdown()


def test_async_scheduling_gives_the_synchronous_outputs(engines):
    sync, async_ = engines
    plain = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 1, 20, 7, 16)]
    reference, num_ahead = _run(sync, plain)
    assert num_ahead == 0
    # stop on a token each request emits mid-way: the step planned ahead of it computes a wasted token
    stops = [SamplingParams(max_tokens=24, stop_token_ids=[tokens[min(3, len(tokens) - 1)]], logprobs=2)
             for tokens, _, _ in reference]
    sampled = SamplingParams(max_tokens=18, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    for params in (plain, stops, [sampled, *plain[1:]]):
        expected, _ = _run(sync, params)
        got, num_ahead = _run(async_, params)
        assert num_ahead > 0
        for (tokens, reason, logprobs), (ref_tokens, ref_reason, ref_logprobs) in zip(got, expected, strict=True):
            assert (tokens, reason) == (ref_tokens, ref_reason)
            for lp, ref in zip(logprobs or (), ref_logprobs or (), strict=True):
                assert lp.top_token_ids == ref.top_token_ids
                assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)
    assert all(reason == "stop" for _, reason, _ in _run(async_, stops)[0])
    assert async_.num_prefill_ahead > 0  # steps with prompt chunks were planned ahead too
    assert async_.scheduler.pool.num_free_blocks == async_.scheduler.pool.num_blocks


def test_prefill_ahead_waits_for_the_end_of_the_step_in_flight_and_takes_arrivals(monkeypatch):
    """--async-prefill plans the next step --ahead-lead-ms before the one in flight should end. Until
    then a step call returns without landing anything, so that a request arriving meanwhile (here, added
    between the calls) joins the step planned next."""
    from mnemosyne.runner.model_runner import PendingStep

    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_memory=0.01,
                                    max_num_batched_tokens=64, seed=0, ahead_lead_ms=10))
    engine.scheduler.predicted_s = lambda step_id: 0.2  # type: ignore[method-assign]
    is_running = [True]
    monkeypatch.setattr(PendingStep, "is_done", lambda self: not is_running[0])  # a CPU step is done at once
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda *a, **kw: plans.append(schedule(*a, **kw)) or plans[-1]  # type: ignore
    engine.add_request(PROMPTS[3], SamplingParams(max_tokens=4, ignore_eos=True), request_id="long")
    started = time.perf_counter()
    assert engine.step() == [] and engine.landed == []  # first chunk queued, then 0.19 s of waiting
    assert 0.15 < time.perf_counter() - started < 5
    assert len(plans) == 1 and engine.pipeline.num_inflight == 1
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True), request_id="new")
    is_running[0] = False
    engine.step()  # now the next step is planned at once, with the arrival, and the first one lands
    assert sorted((c.request_id, c.start, c.num_new_tokens) for c in plans[1].chunks) == [("long", 64, 6),
                                                                                          ("new", 0, 9)]
    assert [(plan.step_id, measured_s > 0) for plan, measured_s in engine.landed] == [(plans[0].step_id, True)]
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()


def test_without_async_prefill_steps_with_prompt_chunks_wait_for_the_landing():
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_memory=0.01,
                                    max_num_batched_tokens=32, seed=0, async_prefill=False))
    engine.num_prefill_ahead = 0  # type: ignore[attr-defined]
    engine.add_request(PROMPTS[3], SamplingParams(max_tokens=4, ignore_eos=True))
    _, num_ahead = _run(engine, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 1, 20, 7, 16)])
    assert num_ahead > 0 and engine.num_prefill_ahead == 0
    engine.shutdown()


@pytest.mark.gpu
def test_async_scheduling_on_the_gpu_gives_the_synchronous_tokens():
    """Decode steps replayed as CUDA graphs, their tokens copied in on the device from the previous
    step's samples: the same batches as the synchronous engine, so the same bf16 tokens exactly."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=1) for n in (40, 24, 33, 40)]
    prompts = [[(11 * i + 5 * j) % 400 + 3 for j in range(n)] for i, n in enumerate((300, 17, 129, 64))]
    results = []
    for is_async in (False, True):
        engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cuda", kv_cache_memory=0.05, seed=0,
                                        async_scheduling=is_async))
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        results.append([done[i] for i in ids])
        engine.shutdown()
    assert results[0] == results[1]
