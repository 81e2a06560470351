"""Run a check on every rank of a gloo world of spawned processes, and collect what each returns."""

from __future__ import annotations

import io
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import torch

from mnemosyne.distributed import comm
from tests.ports import free_port


def _on_rank(check: Callable[[comm.Group], Any], rank: int, world_size: int, port: int, results) -> None:
    try:
        torch.set_num_threads(1)
        world = comm.init_world("gloo", f"tcp://127.0.0.1:{port}", rank, world_size, timeout_s=60)
        # by value: a tensor put on the queue as it is travels as a shared-memory handle that the parent
        # fetches from this process, which may have exited by then (ConnectionResetError under load)
        buffer = io.BytesIO()
        torch.save(check(world), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as e:
        results.put((rank, False, repr(e)))
        raise
    finally:
        comm.destroy_world()


def run_on_ranks(check: Callable[[comm.Group], Any], world_size: int, timeout_s: float = 80) -> dict[int, Any]:
    """check(world) on each of world_size spawned ranks (check must be a module-level function);
    returns each rank's result. Fails naming the ranks that raised, died or did not answer in time."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_on_rank, args=(check, r, world_size, port, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    answers = {}
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout_s)
            answers[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    failed = {rank: value for rank, (ok, value) in answers.items() if not ok}
    assert not failed and all(p.exitcode == 0 for p in procs), (failed, [p.exitcode for p in procs])
    return {rank: torch.load(io.BytesIO(value), weights_only=False) for rank, (_, value) in answers.items()}
