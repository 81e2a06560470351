"""AsyncEngine against a real engine-core process (dummy model, token-id prompts): per-request event
queues, rejection, aborts that free KV at once, admission counters, and the core's death."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.async_engine import AsyncEngine, EngineDeadError
from mnemosyne.engine.core_wire import Delta, Progress
from mnemosyne.request import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CONFIG = EngineConfig(model="dummy:tiny", device="cpu", kv_cache_memory=0.05, max_num_batched_tokens=32)


async def _drain(queue: asyncio.Queue) -> list:
    """Events until the request's last delta (or an error)."""
    events = []
    while True:
        event = await asyncio.wait_for(queue.get(), 60)
        events.append(event)
        if isinstance(event, BaseException) or (isinstance(event, Delta) and event.finish_reason):
            return events


async def _until(predicate, timeout_s: float = 10) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _requests_and_aborts() -> None:
    # progress_s=0 reports every step: on an idle machine the 16 prefill steps of r1 take well
    # under any fixed interval, so an interval made the progress assertion a race
    engine = await AsyncEngine.start(CONFIG, progress_s=0.0)
    try:
        assert engine.info is not None and engine.info.model_name == "dummy:tiny"
        queues = [asyncio.Queue() for _ in range(3)]
        prompts = [[1, 2, 3], list(range(10, 500)), [7] * 40]
        acks = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=5, logprobs=1), q)
                for i, (p, q) in enumerate(zip(prompts, queues, strict=True))]
        assert engine.num_queued_requests == 3 and engine.num_queued_prompt_tokens == sum(map(len, prompts))
        await asyncio.gather(*acks)
        for i, q in enumerate(queues):
            events = await _drain(q)
            deltas = [e for e in events if isinstance(e, Delta)]
            assert all(d.request_id == f"r{i}" for d in deltas)
            assert sum(len(d.new_token_ids) for d in deltas) == 5 and deltas[-1].finish_reason == "length"
            assert sum(len(d.new_logprobs) for d in deltas) == 5
            if i == 1:  # 490 tokens over 32-token steps: progress reports before the first token
                assert any(isinstance(e, Progress) and e.num_prompt_tokens == 490 for e in events)
        assert engine.num_queued_requests == 0

        with pytest.raises(ValueError, match="token ids"):
            await engine.add_request("bad", [10**6], SamplingParams(), asyncio.Queue())
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("long", [1] * 5000, SamplingParams(), asyncio.Queue())

        q = asyncio.Queue()
        await engine.add_request("abort-me", [1, 2, 3], SamplingParams(max_tokens=3000, ignore_eos=True), q)
        assert isinstance(await asyncio.wait_for(q.get(), 30), Delta)
        await _until(lambda: engine.stats is not None and engine.stats.kv_usage > 0)
        engine.abort(["abort-me"])
        await _until(lambda: engine.stats.kv_usage == 0 and engine.stats.num_running == 0, timeout_s=3)
        await asyncio.sleep(0.2)
        assert all(isinstance(e, Delta) and not e.finish_reason for e in _flush(q))  # nothing after the abort
    finally:
        await engine.shutdown()
    assert engine.pid is None


def _flush(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def test_requests_stream_reject_and_abort():
    asyncio.run(_requests_and_aborts())


async def _core_death() -> None:
    engine = await AsyncEngine.start(CONFIG)
    try:
        q = asyncio.Queue()
        await engine.add_request("long", [1, 2, 3], SamplingParams(max_tokens=3000, ignore_eos=True), q)
        assert isinstance(await asyncio.wait_for(q.get(), 30), Delta)
        pid = engine.pid
        os.kill(pid, signal.SIGKILL)
        events = await asyncio.wait_for(_drain(q), 5)
        assert isinstance(events[-1], EngineDeadError) and f"pid {pid}" in str(events[-1])
        assert engine.dead_event.is_set() and not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.add_request("after", [1], SamplingParams(), asyncio.Queue())
    finally:
        await engine.shutdown()


def test_core_death_fails_live_requests():
    asyncio.run(_core_death())
