"""Async scheduling plans each decode-only step while the previous one runs, its tokens taken from that
step's samples on the device. The outputs must be those of the synchronous engine, token for token,
whatever ends the requests (length, a stop token, a stop while a step ahead is in flight) and however
they sample; only when the plans are made changes."""

from __future__ import annotations

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
        return plan

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
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
    assert async_.scheduler.pool.num_free_blocks == async_.scheduler.pool.num_blocks


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
