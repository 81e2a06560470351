"""Group.sum_rounded over 2 gloo processes: a float32 sum rounded once to bf16, identical on every
rank, whether it goes as one float32 all-reduce (small) or as a float32 reduce-scatter and a bf16
all-gather (from SPLIT_SUM_MIN_ELEMENTS on)."""

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
