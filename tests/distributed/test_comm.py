"""Group.sum_rounded over 2 gloo processes: a float32 sum rounded once to bf16, identical on every
rank, whether it goes as one float32 all-reduce (small) or as a float32 reduce-scatter and a bf16
all-gather (from SPLIT_SUM_MIN_ELEMENTS on)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from mnemosyne.distributed import comm
from tests.distributed.test_topology import _free_port

SHAPES = [(3, 64), (comm.SPLIT_SUM_MIN_ELEMENTS // 512, 512), (3, 7)]  # small, split, indivisible


def _part(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(10 * rank + len(shape) + shape[0]))


def _check(rank: int, port: int, results) -> None:
    try:
        torch.set_num_threads(1)
        world = comm.init_world("gloo", f"tcp://127.0.0.1:{port}", rank, 2, timeout_s=60)
        results.put((rank, [world.sum_rounded(_part(rank, shape), torch.bfloat16) for shape in SHAPES]))
    except BaseException as e:
        results.put((rank, repr(e)))
        raise
    finally:
        comm.destroy_world()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sum_rounded_is_the_float32_sum_rounded_once_on_every_rank():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_check, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=80) for _ in procs)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert all(isinstance(v, list) for v in got.values()), got
    for i, shape in enumerate(SHAPES):
        want = (_part(0, shape) + _part(1, shape)).to(torch.bfloat16)
        assert got[0][i].dtype == torch.bfloat16 and got[0][i].shape == shape
        assert torch.equal(got[0][i], want) and torch.equal(got[1][i], want), shape
