"""The `priority` and `deadline` extension fields reach the scheduler: through the engine-core wire
onto the Request, and, end to end, a later request with an urgent hint gets its first token before
an earlier one of the same length (without the hint, the earlier one goes first)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import httpx
import msgspec
import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.core_process import EngineCore
from mnemosyne.engine.core_wire import Added, AddRequest, ToCore, pack_token_ids
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams
from tests.server.harness import MODEL as DEFAULT_MODEL
from tests.server.harness import Server, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "dummy:tiny"
PROMPT_TOKENS = 3072
"""384 steps of 8 tokens: long enough that a request sent after the first one's first progress report
almost always arrives while it is still being prefilled. When it does not, the trial is run again."""
ATTEMPTS = 4
_PROMPT_IDS = itertools.count(1)
"""Every prompt starts differently, so the prefix cache never shortens a prefill."""


def test_hints_cross_the_wire_onto_the_request():
    engine = LLMEngine(EngineConfig(model=MODEL, device="cpu", kv_cache_memory=0.05))
    sent = []
    core = EngineCore(engine, sent.append, progress_s=1.0)
    encode, decoder = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(ToCore)
    try:
        params = SamplingParams(max_tokens=2)
        core.handle(decoder.decode(encode(AddRequest("hinted", pack_token_ids([1, 2, 3]), params, time.monotonic(),
                                                     priority=-3, deadline_s=0.25))))
        core.handle(decoder.decode(encode(AddRequest("plain", pack_token_ids([4, 5]), params, time.monotonic()))))
        assert sent == [Added("hinted"), Added("plain")]
        hinted, plain = engine.scheduler.requests["hinted"], engine.scheduler.requests["plain"]
        assert (hinted.priority, hinted.deadline_s) == (-3, 0.25)
        assert (plain.priority, plain.deadline_s) == (0, None)
        deadlines = engine.scheduler.policy.deadlines
        assert deadlines.deadline_s(hinted) == pytest.approx(0.25 / 8)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def hint_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """LARS with a 60 s TTFT SLO, and 8 prompt tokens a step, all to the most urgent request."""
    log_path = tmp_path_factory.mktemp("hints") / "server.log"
    srv = start_server([MODEL, "--device", "cpu", "--kv-cache-memory", "0.05", "--max-num-batched-tokens", "8",
                        "--chunking", "fixed:8", "--scheduler", "lars", "--ttft-slo-ms", "60000",
                        "--prefill-progress-s", "0.05"], log_path)
    yield srv
    srv.stop(signal.SIGKILL)


async def _first_token_order(server: Server, hints: dict) -> list[str] | None:
    """Stream 'first' (no hints); once its prefill is under way, stream 'second' with `hints`. Returns
    the two names in the order their first tokens arrived, or None when 'first' had its first token
    before 'second' was admitted (the server answers a stream's headers only once the engine holds
    the request), so that the trial shows nothing about scheduling."""
    order: list[str] = []
    started = asyncio.Event()
    admitted_late = False

    async def stream(client: httpx.AsyncClient, name: str, extra: dict) -> None:
        nonlocal admitted_late
        salt = next(_PROMPT_IDS)
        body = {"model": MODEL, "prompt": [(7 * i + 31 * salt) % 500 for i in range(PROMPT_TOKENS)],
                "max_tokens": 2, "ignore_eos": True, "stream": True, **extra}
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            admitted_late = admitted_late or bool(order)
            async for line in r.aiter_lines():
                if line.startswith(": prefill"):
                    started.set()
                elif line.startswith("data: {") and name not in order:
                    order.append(name)

    async with httpx.AsyncClient(timeout=120) as client:
        first = asyncio.create_task(stream(client, "first", {}))
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.gather(first, stream(client, "second", hints))
    return None if admitted_late else order


@pytest.mark.parametrize(("hints", "expected"), [
    ({}, ["first", "second"]),
    ({"deadline": 0.001}, ["second", "first"]),
    ({"priority": -10}, ["second", "first"]),
    ({"priority": -10, "deadline": 0.5}, ["second", "first"]),
])
def test_urgent_hints_overtake_an_earlier_prefill(hint_server: Server, hints: dict, expected: list[str]):
    for _ in range(ATTEMPTS):
        order = asyncio.run(_first_token_order(hint_server, hints))
        if order is not None:
            assert order == expected
            return
    pytest.fail(f"in {ATTEMPTS} trials, the first request always finished its prefill before the second was "
                "admitted: the machine is too fast for this prompt length")


def test_valid_hints_are_accepted_on_both_endpoints(server: Server):
    """The default model's server: chat goes through the template, completions through token ids."""
    bodies = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
              "/v1/completions": {"prompt": [1, 2, 3]}}
    for path, body in bodies.items():
        for hints in ({"priority": 3, "deadline": 2.5}, {"priority": None, "deadline": None}, {"deadline": 1}):
            r = httpx.post(f"{server.url}{path}", headers=server.headers, timeout=60,
                           json={"model": DEFAULT_MODEL, "max_tokens": 2, **body, **hints})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
