"""One KVP group's section of a step plan: which chunks this group computes, over which shard of each
request's KV, and where each multi-group row sits in the (out, lse) gather over the KVP group.

Every rank holds the same replicated state (all requests' block ids, whatever group they live on),
so every group derives the same list of multi-group rows, in plan order: the gather needs no shapes
sent. A request's groups are read off its block ids (`kv/kvp_placement.py` makes them global), in
position order; shard j covers positions [starts[j], starts[j+1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mnemosyne.kv.kvp_placement import group_of_block
from mnemosyne.plan import ScheduledChunk


@dataclass
class KvShards:
    """Where one request's KV lives: its groups in position order and the first position of each."""

    group_ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_blocks: int = 0
    """Blocks of the request seen so far, on every group."""

    def add_blocks(self, block_ids: Sequence[int], blocks_per_group: int, page_size: int,
                   group: int) -> tuple[int, ...]:
        """Record the request's next blocks (global ids, in position order); returns the local ids of
        those that live on `group`, for its block table."""
        local = []
        for block in block_ids:
            owner, local_id = group_of_block(block, blocks_per_group)
            if not self.group_ids or self.group_ids[-1] != owner:
                self.group_ids.append(owner)
                self.starts.append(self.num_blocks * page_size)
            self.num_blocks += 1
            if owner == group:
                local.append(local_id)
        return tuple(local)

    def shard_of(self, position: int) -> int:
        """Index of the shard that holds a position."""
        shard = len(self.starts) - 1
        while self.starts[shard] > position:
            shard -= 1
        return shard


class RequestState(Protocol):
    """What the section needs of a worker's replicated request state."""

    kv: KvShards
    token_ids: Sequence[int]


@dataclass(frozen=True)
class SectionRow:
    """One chunk as this group computes it."""

    chunk: ScheduledChunk
    is_writer: bool
    """The chunk's tokens live in this group's shard: it writes their K/V and attends causally over
    its shard up to them. Otherwise it holds a full earlier shard and attends to all of it."""
    shard_start: int
    """First position of this group's shard of the request."""
    seq_len: int
    """Keys in this group's shard that the chunk's queries see."""
    gather_start: int
    """The chunk's first row in the KVP gather; -1 for a request that lives on one group."""
    is_sampled: bool
    """This group samples the chunk's last token: it reaches (or, scheduled ahead, passes) the last known
    token, and this is the request's first group (active in every one of its steps, so its generator
    sees every sample)."""


def plan_section(chunks: Sequence[ScheduledChunk], requests: Mapping[str, RequestState],
                 group: int) -> tuple[list[SectionRow], int]:
    """This group's rows of a plan, single-token chunks first, and the number of multi-group tokens in
    the whole plan (the gather's rows, the same on every group; 0 means no gather this step).

    Raises RuntimeError if a chunk crosses a group boundary (the scheduler clips chunks there).
    """
    rows: list[SectionRow] = []
    num_gathered = 0
    for chunk in chunks:
        state = requests[chunk.request_id]
        kv = state.kv
        end = chunk.start + chunk.num_new_tokens
        writer = kv.shard_of(end - 1)
        if chunk.start < kv.starts[writer]:
            raise RuntimeError(f"chunk [{chunk.start}, {end}) of {chunk.request_id} crosses a KVP group boundary")
        gather_start = -1
        if writer > 0:
            gather_start, num_gathered = num_gathered, num_gathered + chunk.num_new_tokens
        if group not in kv.group_ids[: writer + 1]:
            continue  # this group holds none of the KV the chunk attends to
        shard = kv.group_ids.index(group)
        is_writer = shard == writer
        seq_len = end - kv.starts[shard] if is_writer else kv.starts[shard + 1] - kv.starts[shard]
        is_sampled = end >= len(state.token_ids) and shard == 0  # past it: a decode scheduled ahead
        rows.append(SectionRow(chunk, is_writer, kv.starts[shard], seq_len, gather_start, is_sampled))
    rows.sort(key=lambda r: r.chunk.num_new_tokens != 1)  # stable: decodes first, as backends expect
    return rows, num_gathered
