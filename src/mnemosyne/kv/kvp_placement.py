"""KV-cache parallelism on the scheduler's side: which KVP group holds each token of a request, and
the block pool of every group.

A request's positions are cut into shards of `group_max_tokens` (L): shard j, positions
[j·L, (j+1)·L), lives on the j-th group of its placement. Block ids are global: local block b of
group g is `g · blocks_per_group + b`, so a request's blocks stay one flat list in position order and
a worker tells each block's group from its id alone (see `group_of_block`).

A request that may grow past L tokens (prompt + max_tokens) reserves, when admitted, every block it
can ever need in all of its groups, so two long requests never deadlock each holding half of what
they need; it is never preempted. A shorter request goes to the least-loaded group, takes blocks as
it grows, and may be preempted as on one device. With one group this is exactly a single block pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.request import Request

logger = logging.getLogger(__name__)


def group_of_block(block_id: int, blocks_per_group: int) -> tuple[int, int]:
    """(group, local block id) of a global block id."""
    return divmod(block_id, blocks_per_group)


@dataclass
class _Placement:
    group_ids: tuple[int, ...]
    """The request's groups in shard order: shard j (positions [j·L, (j+1)·L)) lives on group_ids[j]."""
    reserved_blocks: list[int]
    """Per shard, blocks still reserved for it and not yet allocated (all 0 for a short request)."""

    @property
    def is_reserved(self) -> bool:
        return len(self.group_ids) > 1


class KvpPlacement:
    """The KV blocks of `num_groups` KVP groups and the placement of every request that holds some.

    The scheduler calls `admit` once per admission, `allocate` as a request grows and `free` when it
    finishes or is preempted; `request.block_ids` is the only request state it mutates.
    """

    def __init__(self, num_groups: int, blocks_per_group: int, block_size: int,
                 group_max_tokens: int | None = None):
        self.pools = [BlockPool(blocks_per_group, block_size) for _ in range(num_groups)]
        self.num_groups = num_groups
        self.blocks_per_group = blocks_per_group
        self.block_size = block_size
        capacity = blocks_per_group * block_size
        if group_max_tokens is not None and group_max_tokens % block_size:
            raise ValueError(f"--kvp-group-max-tokens ({group_max_tokens}) must be a multiple of "
                             f"--block-size ({block_size})")
        if group_max_tokens is not None and group_max_tokens > capacity:
            logger.warning("--kvp-group-max-tokens %d exceeds one group's KV capacity; using %d",
                           group_max_tokens, capacity)
        self.group_max_tokens = min(group_max_tokens or capacity, capacity)
        """L: the most tokens of one request held in one group (never more than a group's capacity)."""
        self._blocks_per_shard = self.group_max_tokens // block_size
        self._reserved = [0] * num_groups
        """Per group, blocks promised to admitted long requests and not yet allocated."""
        self._placements: dict[str, _Placement] = {}

    # -- limits and totals ---------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request can ever hold: num_groups × L."""
        return self.num_groups * self.group_max_tokens

    @property
    def limit_text(self) -> str:
        """The limit of `max_request_tokens` in words, for error messages."""
        if self.num_groups == 1:
            return f"the whole KV cache holds ({self.max_request_tokens})"
        return (f"one request can hold: {self.num_groups} KVP groups (--kv-parallel-size) × "
                f"{self.group_max_tokens} tokens per group (--kvp-group-max-tokens, at most a group's KV "
                f"capacity) = {self.max_request_tokens}")

    @property
    def num_blocks(self) -> int:
        return self.num_groups * self.blocks_per_group

    @property
    def num_free_blocks(self) -> int:
        return sum(pool.num_free_blocks for pool in self.pools)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_groups_for(self, num_tokens: int) -> int:
        return max(1, -(-num_tokens // self.group_max_tokens))

    def available_blocks(self, group: int) -> int:
        """Free blocks of a group that no admitted request has reserved."""
        return self.pools[group].num_free_blocks - self._reserved[group]

    # -- per request ---------------------------------------------------------------------------
    def group_ids(self, request_id: str) -> tuple[int, ...]:
        """The groups of a placed request, in shard order."""
        return self._placements[request_id].group_ids

    def active_group_ids(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """The groups that hold the request's first num_tokens tokens: processed // L + 1 of them
        while the tokens at num_tokens - 1 is being computed."""
        return self.group_ids(request_id)[: self.num_groups_for(num_tokens)]

    def is_reserved(self, request: Request) -> bool:
        """Whether the request spans several groups (all reserved at admission; never preempted)."""
        placement = self._placements.get(request.request_id)
        return placement is not None and placement.is_reserved

    def admit(self, request: Request, num_tokens: int, max_tokens: int) -> bool:
        """Place a request that holds no blocks and give it blocks for its first num_tokens tokens.

        A request that may reach max_tokens > L tokens takes the num_groups_for(max_tokens) groups with
        the most available blocks and reserves all it can ever need in each; a shorter one takes the
        least-loaded group. Returns False, changing nothing, if the groups cannot give that now.
        """
        order = sorted(range(self.num_groups), key=lambda g: (-self.available_blocks(g), g))
        num_shards = self.num_groups_for(max_tokens)
        if num_shards == 1:
            if self.blocks_for(num_tokens) > self.available_blocks(order[0]):
                return False
            self._placements[request.request_id] = _Placement((order[0],), [0])
        else:
            last = self.blocks_for(max_tokens - (num_shards - 1) * self.group_max_tokens)
            needs = [self._blocks_per_shard] * (num_shards - 1) + [last]
            chosen = order[:num_shards]
            if len(chosen) < num_shards or any(n > self.available_blocks(g) for g, n in zip(chosen, needs, strict=True)):
                return False
            for group, need in zip(chosen, needs, strict=True):
                self._reserved[group] += need
            self._placements[request.request_id] = _Placement(tuple(chosen), needs)
        self.allocate(request, num_tokens)
        return True

    def blocks_short(self, request: Request, num_tokens: int) -> int:
        """Blocks the request lacks to hold num_tokens that its group cannot give now (0: `allocate`
        will succeed). Always 0 for a reserved request within its reservation."""
        placement = self._placements[request.request_id]
        needed = self.blocks_for(num_tokens) - len(request.block_ids)
        if needed <= 0 or placement.is_reserved:
            return 0
        return max(0, needed - self.available_blocks(placement.group_ids[0]))

    def frees_blocks_for(self, victim: Request, request: Request) -> bool:
        """Whether preempting victim would give request blocks where it lacks them."""
        placement = self._placements.get(victim.request_id)
        return (placement is not None and not placement.is_reserved
                and placement.group_ids[0] == self._placements[request.request_id].group_ids[0])

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Extend request.block_ids to hold num_tokens tokens, each block from the group of its shard
        (out of the reservation, if any). Raises RuntimeError past the placement (check first)."""
        placement = self._placements[request.request_id]
        start, end = len(request.block_ids), self.blocks_for(num_tokens)
        while start < end:
            shard = start // self._blocks_per_shard
            if shard >= len(placement.group_ids):
                raise RuntimeError(f"request {request.request_id} outgrew its {len(placement.group_ids)} KVP groups")
            group = placement.group_ids[shard]
            count = min(end, (shard + 1) * self._blocks_per_shard) - start
            from_reservation = min(count, placement.reserved_blocks[shard])
            placement.reserved_blocks[shard] -= from_reservation
            self._reserved[group] -= from_reservation
            if count > self.available_blocks(group):
                raise RuntimeError(f"group {group} has no {count} free KV blocks for {request.request_id}")
            base = group * self.blocks_per_group
            request.block_ids.extend(base + b for b in self.pools[group].allocate(count))
            start += count

    def free(self, request: Request) -> None:
        """Give back the request's blocks and what is left of its reservation, and forget its placement.
        Does not clear request.block_ids (the scheduler does). Unplaced requests are ignored."""
        placement = self._placements.pop(request.request_id, None)
        if placement is None:
            return
        for group, left in zip(placement.group_ids, placement.reserved_blocks, strict=True):
            self._reserved[group] -= left
        for group, local_ids in self._by_group(request.block_ids).items():
            self.pools[group].free(local_ids)

    def _by_group(self, block_ids: Iterable[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for block in block_ids:
            group, local = group_of_block(block, self.blocks_per_group)
            out.setdefault(group, []).append(local)
        return out
