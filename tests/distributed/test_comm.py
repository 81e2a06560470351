"""Group collectives over gloo processes. sum_rounded: a float32 sum rounded once to bf16, identical
on every rank, whether it goes as one float32 all-reduce (small) or as a float32 reduce-scatter and a
bf16 all-gather (from SPLIT_SUM_MIN_ELEMENTS on). all_gather_stacked: rank order."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.distributed import comm
from tests.distributed.ranks import run_on_ranks

SHAPES = [(3, 64), (comm.SPLIT_SUM_MIN_ELEMENTS // 512, 512), (3, 7)]  # small, split, indivisible


def _part(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(10 * rank + len(shape) + shape[0]))


def _sums(world: comm.Group) -> list[torch.Tensor]:
    return [world.sum_rounded(_part(world.rank, shape), torch.bfloat16) for shape in SHAPES]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sum_rounded_is_the_float32_sum_rounded_once_on_every_rank():
    got = run_on_ranks(_sums, 2)
    for i, shape in enumerate(SHAPES):
        want = (_part(0, shape) + _part(1, shape)).to(torch.bfloat16)
        assert got[0][i].dtype == torch.bfloat16 and got[0][i].shape == shape
        assert torch.equal(got[0][i], want) and torch.equal(got[1][i], want), shape


def _stacked(world: comm.Group) -> torch.Tensor:
    return world.all_gather_stacked(torch.full((2, 3), float(world.rank)) + torch.arange(3.0))


@pytest.mark.timeout(90)
def test_all_gather_stacked_puts_each_rank_on_its_own_row():
    """KVP's one gather per layer: every rank's part on a new first axis, in rank order."""
    got = run_on_ranks(_stacked, 3)
    want = torch.stack([torch.full((2, 3), float(r)) + torch.arange(3.0) for r in range(3)])
    assert all(torch.equal(g, want) for g in got.values())
