"""Overload (429 past the admission limits, then full recovery) and engine-core death (in-flight
requests fail fast, /health turns 503, the server exits 1). A dummy model with token-id prompts and a
16-token step budget makes prefill slow enough that queues build up deterministically."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from tests.server.harness import Server, pid_alive, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "dummy:tiny"
MAX_WAITING = 4
MAX_QUEUED_TOKENS = 1200


@pytest.fixture(scope="module")
def dummy_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    log_path = tmp_path_factory.mktemp("dummy") / "server.log"
    srv = start_server([MODEL, "--device", "cpu", "--kv-cache-memory", "0.05", "--max-num-batched-tokens", "16",
                        "--max-waiting-requests", str(MAX_WAITING),
                        "--max-queued-prompt-tokens", str(MAX_QUEUED_TOKENS)], log_path)
    yield srv
    srv.stop(signal.SIGKILL)


async def _burst(server: Server, prompt_len: int, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(
            client.post(f"{server.url}/v1/completions",
                        json={"model": MODEL, "prompt": [(i + j) % 500 for j in range(prompt_len)], "max_tokens": 2})
            for i in range(count)))


def _check_429(responses: list[httpx.Response], limit_name: str) -> tuple[int, int]:
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(rejected) == len(responses), [r.text for r in responses]
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and limit_name.replace("_", "-") in error["message"]
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == 2
    return len(ok), len(rejected)


def test_overload_gets_429_then_recovers(dummy_server: Server):
    # 250-token prompts take 16 steps each to prefill, one after another, so the burst queues up.
    ok, rejected = _check_429(asyncio.run(_burst(dummy_server, 250, 16)), "max_waiting_requests")
    assert ok >= MAX_WAITING and rejected >= 1
    # 500-token prompts: the third would queue 1500 prompt tokens, over the limit of 1200.
    ok2, rejected2 = _check_429(asyncio.run(_burst(dummy_server, 500, 3)), "max_queued_prompt_tokens")
    assert ok2 >= 2 and rejected2 >= 1
    metrics = dummy_server.metrics()
    assert metrics['mnemosyne_requests_rejected_total{limit="max_waiting_requests"}'] == rejected
    assert metrics['mnemosyne_requests_rejected_total{limit="max_queued_prompt_tokens"}'] == rejected2
    # Recovery: once the queue drains everything is admitted again.
    assert metrics["mnemosyne_num_requests_waiting"] == 0 and metrics["mnemosyne_kv_cache_usage_ratio"] == 0
    responses = asyncio.run(_burst(dummy_server, 100, MAX_WAITING))
    assert [r.status_code for r in responses] == [200] * MAX_WAITING
    assert httpx.get(f"{dummy_server.url}/health", timeout=10).status_code == 200


def test_engine_core_death_fails_in_flight_requests(dummy_server: Server):
    core_pid = dummy_server.core_pid()
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4000}
    outcome: dict[str, object] = {}

    def non_streaming() -> None:
        r = httpx.post(f"{dummy_server.url}/v1/completions", json=body, timeout=60)
        outcome["non_streaming"] = (r.status_code, r.json(), time.monotonic())

    thread = threading.Thread(target=non_streaming)
    thread.start()
    events = []
    with httpx.stream("POST", f"{dummy_server.url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        deadline_s = time.monotonic() + 30
        while dummy_server.metrics()["mnemosyne_num_requests_running"] < 2:  # both requests are in flight
            assert time.monotonic() < deadline_s
            time.sleep(0.05)
        os.kill(core_pid, signal.SIGKILL)
        killed_s = time.monotonic()
        for line in lines:
            if line.startswith("data:"):
                events.append(line)
        ended_s = time.monotonic()
    assert ended_s - killed_s < 5, "the stream hung after the engine core died"
    assert '"error"' in events[-1] and "engine" in events[-1], events[-3:]
    thread.join(30)
    status, error_body, answered_s = outcome["non_streaming"]
    assert status == 503 and error_body["error"]["type"] == "server_error"
    assert answered_s - killed_s < 5
    health = []
    while True:  # /health says 503 until the port closes
        try:
            health.append(httpx.get(f"{dummy_server.url}/health", timeout=5).status_code)
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    assert 503 in health and 200 not in health
    assert dummy_server.proc.wait(30) == 1
    assert f"exited with code -{signal.SIGKILL}" in dummy_server.log()
    assert not pid_alive(core_pid)
