"""The rank grid: world = kvp × pp × tp, ordered (kvp, pp, tp) with tp varying fastest, and the
tp, pp and kvp process groups each rank belongs to, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from mnemosyne.config import ModelConfig
from mnemosyne.distributed import comm
from mnemosyne.distributed.comm import SINGLE, Group


@dataclass(frozen=True)
class ParallelLayout:
    """The shape of the rank grid; pure arithmetic, no processes."""

    kvp_size: int = 1
    pp_size: int = 1
    tp_size: int = 1
    layer_split: tuple[int, ...] | None = None
    """Layers of each pipeline stage, in stage order; None: an even split."""

    def __post_init__(self) -> None:
        for name in ("kvp_size", "pp_size", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.layer_split is not None and (len(self.layer_split) != self.pp_size or min(self.layer_split) <= 0):
            raise ValueError(f"--pp-layer-split needs {self.pp_size} positive layer counts, got {self.layer_split}")

    @property
    def world_size(self) -> int:
        return self.kvp_size * self.pp_size * self.tp_size

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(kvp_rank, pp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return rank // (self.pp_size * self.tp_size), rank // self.tp_size % self.pp_size, rank % self.tp_size

    def rank_of(self, kvp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (kvp_rank * self.pp_size + pp_rank) * self.tp_size + tp_rank

    def tp_partition(self) -> list[tuple[int, ...]]:
        """Ranks of each tp group: one per (kvp, pp) cell, consecutive ranks."""
        return [tuple(self.rank_of(k, p, t) for t in range(self.tp_size))
                for k in range(self.kvp_size) for p in range(self.pp_size)]

    def pp_partition(self) -> list[tuple[int, ...]]:
        """Ranks of each pipeline: one per (kvp, tp) cell, stage order."""
        return [tuple(self.rank_of(k, p, t) for p in range(self.pp_size))
                for k in range(self.kvp_size) for t in range(self.tp_size)]

    def kvp_partition(self) -> list[tuple[int, ...]]:
        """Ranks that hold the same shard in each KV-parallel replica: one group per (pp, tp) cell."""
        return [tuple(self.rank_of(k, p, t) for k in range(self.kvp_size))
                for p in range(self.pp_size) for t in range(self.tp_size)]

    def layer_range(self, pp_rank: int, num_layers: int) -> tuple[int, int]:
        """Layers [start, end) of a pipeline stage: the explicit split, else an even split where
        earlier stages take the remainder."""
        if self.layer_split is not None:
            if sum(self.layer_split) != num_layers:
                raise ValueError(f"--pp-layer-split {','.join(map(str, self.layer_split))} covers "
                                 f"{sum(self.layer_split)} layers; the model has {num_layers}")
            start = sum(self.layer_split[:pp_rank])
            return start, start + self.layer_split[pp_rank]
        if self.pp_size > num_layers:
            raise ValueError(f"--pipeline-parallel-size {self.pp_size} exceeds the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return start, start + base + (pp_rank < extra)

    @property
    def output_rank(self) -> int:
        """The first of `output_ranks`: tp_rank 0 of the last stage of replica 0."""
        return self.rank_of(0, self.pp_size - 1, 0)

    @property
    def output_ranks(self) -> tuple[int, ...]:
        """The ranks that reply with sampled tokens: tp_rank 0 of the last stage of each KV replica,
        for the requests that replica samples (each request is sampled by exactly one)."""
        return tuple(self.rank_of(k, self.pp_size - 1, 0) for k in range(self.kvp_size))


@dataclass(frozen=True)
class RankTopology:
    """Where one rank sits in the grid and the groups its layers communicate over."""

    layout: ParallelLayout
    rank: int
    kvp_rank: int
    pp_rank: int
    tp_rank: int
    world: Group
    tp_group: Group
    pp_group: Group
    kvp_group: Group

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.layout.pp_size - 1

    @property
    def pp_prev_rank(self) -> int | None:
        """Global rank of the previous stage (same kvp and tp coordinates), None on the first stage."""
        return None if self.is_first_pp_stage else self.pp_group.ranks[self.pp_rank - 1]

    @property
    def pp_next_rank(self) -> int | None:
        return None if self.is_last_pp_stage else self.pp_group.ranks[self.pp_rank + 1]

    @property
    def is_output_rank(self) -> bool:
        return self.rank in self.layout.output_ranks


def build_topology(layout: ParallelLayout, world: Group) -> RankTopology:
    """Create the tp, pp and kvp groups. Collective: every rank calls it once, after joining the world."""
    if world.size != layout.world_size:
        raise ValueError(f"the world has {world.size} ranks, the layout {layout} needs {layout.world_size}")
    kvp_rank, pp_rank, tp_rank = layout.coords(world.rank)
    # torch.distributed needs every rank to create every group, in the same order.
    tp_group = comm.new_groups(layout.tp_partition(), world.rank)
    pp_group = comm.new_groups(layout.pp_partition(), world.rank)
    kvp_group = comm.new_groups(layout.kvp_partition(), world.rank)
    return RankTopology(layout, world.rank, kvp_rank, pp_rank, tp_rank, world, tp_group, pp_group, kvp_group)


def single_rank_topology() -> RankTopology:
    """The topology of a one-process run: every group is the identity."""
    return RankTopology(ParallelLayout(), 0, 0, 0, 0, SINGLE, SINGLE, SINGLE, SINGLE)


def check_shardable(model: ModelConfig, layout: ParallelLayout) -> None:
    """Raise ValueError, naming the flag, if the model cannot be split over this layout."""
    tp = layout.tp_size
    for what, n in (("attention heads", model.num_heads), ("intermediate size", model.intermediate_size)):
        if n % tp:
            raise ValueError(f"--tensor-parallel-size {tp} does not divide the model's {what} ({n})")
    kv = model.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(f"--tensor-parallel-size {tp} and the model's {kv} kv heads: one must divide the other")
    layout.layer_range(0, model.num_layers)
