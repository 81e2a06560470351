"""The rank grid: coordinates, group partitions and stage splits (pure), and the process groups
torch.distributed builds from them (4 gloo processes)."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.distributed import comm
from mnemosyne.distributed.topology import ParallelLayout, build_topology, check_shardable
from tests.distributed.ranks import run_on_ranks

GRID = ParallelLayout(kvp_size=2, pp_size=3, tp_size=4)


@pytest.mark.timeout(10)
def test_grid_order_is_kvp_pp_tp_with_tp_fastest():
    assert GRID.world_size == 24
    assert [GRID.coords(r) for r in (0, 1, 3, 4, 11, 12, 23)] == [
        (0, 0, 0), (0, 0, 1), (0, 0, 3), (0, 1, 0), (0, 2, 3), (1, 0, 0), (1, 2, 3)]
    assert all(GRID.rank_of(*GRID.coords(r)) == r for r in range(24))
    with pytest.raises(ValueError, match="outside"):
        GRID.coords(24)


@pytest.mark.timeout(10)
def test_partitions_cover_the_world_once_each():
    for partition, size in ((GRID.tp_partition(), 4), (GRID.pp_partition(), 3), (GRID.kvp_partition(), 2)):
        assert sorted(r for group in partition for r in group) == list(range(24))
        assert {len(group) for group in partition} == {size}
    assert GRID.tp_partition()[0] == (0, 1, 2, 3)
    assert GRID.pp_partition()[1] == (1, 5, 9)  # same tp rank, consecutive stages
    assert GRID.kvp_partition()[5] == (5, 17)  # same (pp, tp) cell in both replicas


@pytest.mark.timeout(10)
def test_an_explicit_layer_split_is_followed_and_checked():
    layout = ParallelLayout(pp_size=3, layer_split=EngineConfig(
        pipeline_parallel_size=3, pp_layer_split="10,12,10").layer_split)
    assert [layout.layer_range(p, 32) for p in range(3)] == [(0, 10), (10, 22), (22, 32)]
    with pytest.raises(ValueError, match="pp-layer-split 10,12,10 covers 32 layers; the model has 30"):
        layout.layer_range(0, 30)
    for bad in ("10,22", "10,x,12", "0,16,16"):
        with pytest.raises(ValueError, match="pp-layer-split must be 3 positive layer counts"):
            EngineConfig(pipeline_parallel_size=3, pp_layer_split=bad)


@pytest.mark.timeout(10)
def test_layer_ranges_split_evenly_and_cover_every_layer():
    layout = ParallelLayout(pp_size=3)
    assert [layout.layer_range(p, 8) for p in range(3)] == [(0, 3), (3, 6), (6, 8)]
    with pytest.raises(ValueError, match="pipeline-parallel-size"):
        ParallelLayout(pp_size=4).layer_range(0, 2)
    assert GRID.output_rank == GRID.rank_of(0, 2, 0)
    # one replying rank per KV replica: tp rank 0 of its last stage
    assert GRID.output_ranks == tuple(GRID.rank_of(k, 2, 0) for k in range(GRID.kvp_size))


@pytest.mark.timeout(10)
def test_unshardable_layouts_are_refused_with_the_flag_named():
    tiny = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    check_shardable(tiny, ParallelLayout(tp_size=4))  # 2 kv heads over 4 ranks: replicated
    with pytest.raises(ValueError, match="tensor-parallel-size 3"):
        check_shardable(tiny, ParallelLayout(tp_size=3))
    with pytest.raises(ValueError, match="kv heads"):
        check_shardable(ModelConfig(vocab_size=512, hidden_size=96, intermediate_size=96, num_layers=2,
                                    num_heads=6, num_kv_heads=3, head_dim=16), ParallelLayout(tp_size=2))


def _check_groups(world: comm.Group) -> None:
    rank = world.rank
    for layout in (ParallelLayout(pp_size=2, tp_size=2), ParallelLayout(kvp_size=2, tp_size=2)):
        topo = build_topology(layout, world)
        for group, partition in ((topo.tp_group, layout.tp_partition()), (topo.pp_group, layout.pp_partition()),
                                 (topo.kvp_group, layout.kvp_partition())):
            mine = next(g for g in partition if rank in g)
            assert group.ranks == mine and group.rank == mine.index(rank)
            total = group.all_reduce(torch.tensor([rank]))  # sums exactly the member ranks
            assert total.item() == sum(mine), (layout, group.ranks, total)
            assert group.all_reduce(torch.tensor([rank]), op="min").item() == min(mine)
            gathered = group.all_gather(torch.tensor([rank]), dim=0)
            assert gathered.tolist() == list(mine)
        if layout.pp_size == 2:
            assert (topo.pp_prev_rank, topo.pp_next_rank) == ((None, rank + 2) if rank < 2 else (rank - 2, None))
        assert world.broadcast_object({"from": rank}, src_rank=0) == {"from": 0}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_process_groups_match_the_grid():
    run_on_ranks(_check_groups, 4)
