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

With prefix caching on, a request's full blocks are indexed by their chained hash once their tokens
have KV (`cache_computed`), and a new request reuses the longest cached prefix of its tokens
(`lookup`, then `admit`) in place: each reused shard stays on the group that holds it, in shard
order, and the request's own blocks continue after them. See docs/prefix_cache.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mnemosyne.kv.block_hash import extend_block_hashes
from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.request import Request

logger = logging.getLogger(__name__)

HASH_BATCH = 64
"""Block hashes a prefix-cache lookup computes at a time, as far as its hit reaches (1,024 tokens at
blocks of 16)."""

RUN_MIN_TOKENS = 8192
"""Prompts at least this long start a claimed run of blocks that holds the whole prompt (see
kv/block_pool.py): their chunks attend to the prompt's earlier KV run by run, one cuDNN call each."""


def group_of_block(block_id: int, blocks_per_group: int) -> tuple[int, int]:
    """(group, local block id) of a global block id."""
    return divmod(block_id, blocks_per_group)


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix a request can reuse: its first num_tokens tokens, in whole blocks."""

    block_ids: tuple[int, ...]
    """Global ids of the cached blocks, in position order."""
    group_ids: tuple[int, ...]
    """The groups holding the hit's shards, in shard order: the request must be placed on them."""
    num_tokens: int


NO_HIT = PrefixHit((), (), 0)


@dataclass
class _Placement:
    group_ids: tuple[int, ...]
    """The request's groups in shard order: shard j (positions [j·L, (j+1)·L)) lives on group_ids[j]."""
    reserved_blocks: list[int]
    """Per shard, blocks still reserved for it and not yet allocated (all 0 for a short request)."""
    num_cached_blocks: int = 0
    """The request's first blocks that are indexed in the prefix cache (reused or computed)."""

    @property
    def is_reserved(self) -> bool:
        return len(self.group_ids) > 1


class KvpPlacement:
    """The KV blocks of `num_groups` KVP groups and the placement of every request that holds some.

    The scheduler calls `lookup` and then `admit` once per admission, `allocate` as a request grows,
    `cache_computed` as its tokens get KV and `free` when it finishes or is preempted;
    `request.block_ids` and `request.block_hashes` are the only request state it mutates.
    """

    def __init__(self, num_groups: int, blocks_per_group: int, block_size: int,
                 group_max_tokens: int | None = None, enable_prefix_caching: bool = False):
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
        self.enable_prefix_caching = enable_prefix_caching
        self._hits: dict[str, tuple[int, PrefixHit]] = {}
        """Per waiting request, its last lookup and the eviction count then: still valid if none since."""
        self.num_queried_tokens = 0
        """Tokens of requests admitted with prefix caching on (readmissions after preemption too)."""
        self.num_hit_tokens = 0
        """Of those, tokens whose KV was reused from the prefix cache."""

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

    @property
    def num_evicted_blocks(self) -> int:
        """Cached blocks evicted to be reused, in all groups, since the start."""
        return sum(pool.num_evictions for pool in self.pools)

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

    def lookup(self, request: Request) -> PrefixHit:
        """The longest cached prefix a request that holds no blocks can reuse in place: whole blocks, at
        most num_tokens - 1 tokens (the last token is always computed, for its logits), each shard's
        blocks on one group and each shard on a different group. NO_HIT with caching off. Mutates only
        request.block_hashes, which it extends only as far as the hit goes (plus a batch): hashing a
        whole 1M-token prompt up front held the engine core, and every running request's next token,
        for 0.31 s on the development machine (59 ms at 162K tokens). `cache_computed` hashes the rest
        as the prompt's chunks land. Amortised O(new blocks): an earlier lookup's hit is extended,
        unless blocks were evicted since."""
        if not self.enable_prefix_caching:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        num_evicted = self.num_evicted_blocks
        memo = self._hits.get(request.request_id)
        hit = memo[1] if memo is not None and memo[0] == num_evicted else NO_HIT
        hit = self._extend(hit, request, max_blocks)
        self._hits[request.request_id] = (num_evicted, hit)
        return hit

    def _extend(self, hit: PrefixHit, request: Request, max_blocks: int) -> PrefixHit:
        """`hit` grown block by block: a shard already begun continues on its group; a new shard takes
        the unused group with the longest run of cached blocks."""
        block_ids, group_ids = list(hit.block_ids), list(hit.group_ids)
        while len(block_ids) < max_blocks:
            shard = len(block_ids) // self._blocks_per_shard
            end = min(max_blocks, (shard + 1) * self._blocks_per_shard)
            candidates = ([group_ids[shard]] if shard < len(group_ids)
                          else [g for g in range(self.num_groups) if g not in group_ids])
            best_group, best = -1, []
            for group in candidates:
                run = self._cached_run(group, request, len(block_ids), end)
                if len(run) > len(best):
                    best_group, best = group, run
            if not best:
                break
            if shard == len(group_ids):
                group_ids.append(best_group)
            block_ids.extend(best_group * self.blocks_per_group + b for b in best)
            if len(block_ids) < end:
                break
        return PrefixHit(tuple(block_ids), tuple(group_ids), len(block_ids) * self.block_size)

    def _cached_run(self, group: int, request: Request, start: int, end: int) -> list[int]:
        """Local ids of the group's cached blocks for the request's blocks [start, end), up to the first
        miss; the request's block hashes are computed HASH_BATCH at a time as the run needs them."""
        pool, run, hashes = self.pools[group], [], request.block_hashes
        for i in range(start, end):
            if i >= len(hashes):
                extend_block_hashes(hashes, request.token_ids, self.block_size, min(end, i + HASH_BATCH))
            block = pool.cached_block(hashes[i])
            if block is None:
                break
            run.append(block)
        return run

    def admit(self, request: Request, num_tokens: int, max_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Place a request that holds no blocks and give it blocks for its first num_tokens tokens: the
        hit's cached blocks (from `lookup`; its shards stay on the hit's groups, in order), then new ones.

        A request that may reach max_tokens > L tokens takes the num_groups_for(max_tokens) groups with
        the most available blocks (after the hit's) and reserves all it can ever need in each; a shorter
        one takes the hit's group, else the least-loaded one. Returns False, changing nothing, if the
        groups cannot give that now.
        """
        shared = self._by_group(hit.block_ids)
        # a reused block that nobody uses leaves the free count when taken, like a new one
        num_taken = {g: sum(self.pools[g].is_evictable(b) for b in ids) for g, ids in shared.items()}
        order = sorted((g for g in range(self.num_groups) if g not in hit.group_ids),
                       key=lambda g: (-self.available_blocks(g), g))
        num_shards = self.num_groups_for(max_tokens)
        if num_shards == 1:
            group = hit.group_ids[0] if hit.group_ids else order[0]
            needed = self.blocks_for(num_tokens) - len(hit.block_ids) + num_taken.get(group, 0)
            if needed > self.available_blocks(group):
                return False
            placement = _Placement((group,), [0])
        else:
            last = self.blocks_for(max_tokens - (num_shards - 1) * self.group_max_tokens)
            per_shard = [self._blocks_per_shard] * (num_shards - 1) + [last]
            num_hit = len(hit.block_ids)
            needs = [n - min(n, max(0, num_hit - j * self._blocks_per_shard)) for j, n in enumerate(per_shard)]
            chosen = (*hit.group_ids, *order[: num_shards - len(hit.group_ids)])
            if len(chosen) < num_shards or any(n + num_taken.get(g, 0) > self.available_blocks(g)
                                               for g, n in zip(chosen, needs, strict=True)):
                return False
            for group, need in zip(chosen, needs, strict=True):
                self._reserved[group] += need
            placement = _Placement(chosen, needs)
        for group, local_ids in shared.items():
            self.pools[group].share(local_ids)
        request.block_ids.extend(hit.block_ids)
        placement.num_cached_blocks = len(hit.block_ids)
        self._placements[request.request_id] = placement
        self._hits.pop(request.request_id, None)
        if self.enable_prefix_caching:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += hit.num_tokens
        self.allocate(request, num_tokens)
        return True

    def cache_computed(self, request: Request, num_computed_tokens: int) -> None:
        """Index the request's blocks whose tokens all have KV now (the first num_computed_tokens), so
        later requests can reuse them. Called as steps land; O(blocks filled since the last call)."""
        placement = self._placements.get(request.request_id)
        if not self.enable_prefix_caching or placement is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= placement.num_cached_blocks:
            return
        extend_block_hashes(request.block_hashes, request.token_ids, self.block_size, num_full)
        for i in range(placement.num_cached_blocks, num_full):
            group, local = group_of_block(request.block_ids[i], self.blocks_per_group)
            self.pools[group].cache(local, request.block_hashes[i])
        placement.num_cached_blocks = num_full

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
            # Grow in place after the shard's last block; a long prompt in a run that holds its shard
            last = request.block_ids[-1] - base if start % self._blocks_per_shard else None
            prompt_end = min(self.blocks_for(request.num_prompt_tokens), (shard + 1) * self._blocks_per_shard)
            run = prompt_end - start if request.num_prompt_tokens >= RUN_MIN_TOKENS and prompt_end > start else None
            request.block_ids.extend(
                base + b for b in self.pools[group].allocate(count, last, run, owner=request.request_id))
            start += count

    def free(self, request: Request) -> None:
        """Give back the request's blocks (cached ones stay cached, evictable once nobody uses them) and
        what is left of its reservation, and forget its placement and lookups. Does not clear
        request.block_ids (the scheduler does). Unplaced requests are ignored."""
        self._hits.pop(request.request_id, None)
        placement = self._placements.pop(request.request_id, None)
        if placement is None:
            return
        for group, left in zip(placement.group_ids, placement.reserved_blocks, strict=True):
            self._reserved[group] -= left
            self.pools[group].unclaim(request.request_id)
        # last position first: a cached prefix's tail is evicted before the head that every hit needs
        for group, local_ids in self._by_group(reversed(request.block_ids)).items():
            self.pools[group].free(local_ids)

    def _by_group(self, block_ids: Iterable[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for block in block_ids:
            group, local = group_of_block(block, self.blocks_per_group)
            out.setdefault(group, []).append(local)
        return out
