"""A two-node torchrun launch (both nodes on this machine, 2 processes each, tp=4): global rank 0's
output equals the single-process run's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.ports import free_port

DEMO = ["-m", "mnemosyne.executor.torchrun_demo", "dummy:tiny", "--device", "cpu", "--kv-cache-memory", "0.01",
        "--max-num-batched-tokens", "16", "--max-tokens", "32",
        "--prompt-token-ids", "1,2,3,4,5", "--prompt-token-ids", ",".join(map(str, range(40))),
        "--prompt-token-ids", "300,2"]



def _token_ids(stdout: str) -> list[list[int]]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])["token_ids"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_node_torchrun_matches_single_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MNEMOSYNE_QUIET": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    nodes = [subprocess.Popen([*torchrun, "--node-rank", str(node), *DEMO, "-tp", "4"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for node in (1, 0)]
    try:
        (out1, err1), (out0, err0) = (node.communicate(timeout=150) for node in nodes)
    finally:
        for node in nodes:
            node.kill()
    assert nodes[1].returncode == 0, err0[-3000:]
    assert nodes[0].returncode == 0, err1[-3000:]
    assert not [line for line in out1.splitlines() if line.startswith("{")]  # only global rank 0 reports
    single = subprocess.run([sys.executable, *DEMO], env=env, text=True, capture_output=True, timeout=60)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _token_ids(out0) == _token_ids(single.stdout)
    assert all(len(ids) == 32 for ids in _token_ids(out0))


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killing_a_remote_worker_fails_the_run_within_10s():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MNEMOSYNE_QUIET": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    long_run = [*DEMO, "-tp", "4", "--max-tokens", "3000"]
    node1 = subprocess.Popen([*torchrun, "--node-rank", "1", *long_run], env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node0 = subprocess.Popen([*torchrun, "--node-rank", "0", *long_run], env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in node0.stderr:
            if "engine ready" in line:
                break
        victim = max(_children(node1.pid))  # a worker process of the other node (global rank 2 or 3)
        time.sleep(1.0)  # mid-generation
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        stderr = node0.stderr.read()
        node0.wait(timeout=30)
        elapsed_s = time.monotonic() - killed_at
    finally:
        node0.kill()
        node1.kill()
    assert node0.returncode != 0
    assert re.search(r"WorkerFailedError: worker rank [23] ", stderr), stderr[-3000:]
    assert elapsed_s < 10, elapsed_s
