"""Failures end a run quickly and by name: a killed worker, a worker that raises, and an engine that
dies (its workers must not outlive it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mnemosyne import LLM, SamplingParams
from mnemosyne.executor.multiproc import WorkerFailedError
from mnemosyne.plan import ScheduledChunk, StepPlan

ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=16, tensor_parallel_size=2, device="cpu")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purposes: it runs nothing and holds no socket.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_worker_ends_generate_with_a_clear_error_within_10s():
    llm = LLM("dummy:tiny", **ENGINE)
    pids = llm.engine.executor.worker_pids
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Timer(1.5, kill)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match=r"worker rank 1 died unexpectedly \(killed by SIGKILL\)") as info:
            llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=3000), use_tqdm=False)
    finally:
        killer.cancel()
    assert killed_at, "generation finished before the worker was killed"
    assert time.monotonic() - killed_at[0] < 10
    assert isinstance(info.value, WorkerFailedError) and info.value.rank == 1
    assert _wait_gone(list(pids.values()), timeout_s=10), "the surviving worker was not shut down"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_exception_comes_back_with_its_traceback():
    llm = LLM("dummy:tiny", **ENGINE)
    pids = llm.engine.executor.worker_pids
    bad = StepPlan(10**6, (), (ScheduledChunk("no-such-request", 0, 1, (), ()),), ())
    with pytest.raises(WorkerFailedError, match=r"worker rank [01] raised KeyError: 'no-such-request'") as info:
        llm.engine.executor.execute(bad)
    assert "Traceback" in str(info.value) and "model_runner.py" in str(info.value)
    assert _wait_gone(list(pids.values()), timeout_s=10)
    llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="raised KeyError"):  # the engine stays failed, it never hangs
        llm.engine.step()


_ENGINE_SCRIPT = """
import json, sys, time
from mnemosyne import LLM
llm = LLM("dummy:tiny", kv_cache_memory=0.01, tensor_parallel_size=2, device="cpu")
print(json.dumps(list(llm.engine.executor.worker_pids.values())), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_workers_exit_when_the_engine_dies():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE_SCRIPT], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pids = json.loads(engine.stdout.readline())
        engine.kill()
        engine.wait()
        assert _wait_gone(pids, timeout_s=15), "workers outlived their engine"
    finally:
        engine.kill()
