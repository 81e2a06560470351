"""A pool of fixed-size KV blocks shared by all requests of one KV group, with the prefix cache's
bookkeeping: a reference count per block and an index from block hash (kv/block_hash.py) to the
block that holds that prefix.

A block is in exactly one of three states: in use (reference count > 0), free and cached (count
0, still indexed by its hash, evictable), or free and empty. Cached free blocks count as free:
`allocate` takes empty blocks first and then evicts cached ones, least recently freed first. A
block in use is never evicted, so eviction can never touch a running request's KV.

Where empty blocks go: a request's KV should sit in few runs of consecutive blocks, because a long
prompt's later chunks attend to its earlier ones run by run (one cuDNN call per run and layer). So a
request grows in place (`after`: its last block) while the blocks there are empty. A long prompt
(`run`: the blocks it will need) starts the lowest run of empty blocks that holds all of it, and
claims that run: no other long prompt starts inside it while it grows there chunk by chunk.
Everything else (short prompts, in one chunk or several, and decode growth) takes the highest empty
blocks, in ascending order. Short requests then come and go at the top while long prompts grow at the
bottom, instead of being cut into a run per chunk. Claims are soft: when the top runs out, short
requests take claimed blocks too.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: give it more memory (--kv-cache-memory)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: set[int] = set(range(num_blocks))
        """Free blocks that hold no cached prefix."""
        self._highest: list[int] = [-b for b in reversed(range(num_blocks))]
        """A min-heap of negated ids over _free, with stale entries (skipped when popped)."""
        self._claims: dict[Hashable, range] = {}
        """Each long prompt's run of blocks, by owner: where it grows and no other run starts."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Free blocks that still hold a cached prefix, least recently freed first."""
        self._num_refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_evictions = 0
        """Cached blocks dropped from the index to be reused, since the pool was made."""

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks indexed by a hash, in use or not."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int, after: int | None = None, run: int | None = None,
                 owner: Hashable = None) -> list[int]:
        """Take num_blocks free blocks: the empty ones right after block `after` (a request's last);
        then, for a long prompt (run: the blocks it still needs, num_blocks included), the start of
        the lowest unclaimed run of that many empty blocks (else the longest), which `owner` claims;
        then the highest empty ones, in ascending order; then cached ones, least recently freed
        first. Raises RuntimeError if there are not enough (check first)."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks with {self.num_free_blocks} free")
        out = []
        if after is not None:
            self._take_from(after + 1, num_blocks, out)
        if len(out) < num_blocks and run is not None:
            start, length = self._find_run(max(run, num_blocks - len(out)), owner)
            if length:
                self._claims[owner] = range(start, start + length)
                self._take_from(start, num_blocks, out)
        rest = min(num_blocks - len(out), len(self._free))
        out.extend(sorted(self._take_highest(rest)))
        while len(out) < num_blocks:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.num_evictions += 1
            out.append(block)
        for block in out:
            self._num_refs[block] = 1
        return out

    def unclaim(self, owner: Hashable) -> None:
        """Drop owner's claim on a run (its prompt is done, or it was freed); none is fine."""
        self._claims.pop(owner, None)

    def _take_from(self, block: int, num_blocks: int, out: list[int]) -> None:
        """Append to out the empty blocks from `block` on, up to the first one that is not, until it holds num_blocks."""
        while len(out) < num_blocks and block in self._free:
            self._free.remove(block)
            out.append(block)
            block += 1

    def _find_run(self, length: int, owner: Hashable) -> tuple[int, int]:
        """(start, length) of the lowest run of `length` empty blocks outside other owners' claims,
        else of the longest such run; length 0 if there is none. O(free blocks): once per long prompt,
        and again only when another request has taken the block its prompt was to grow into."""
        claimed = sorted((r.start, r.stop) for o, r in self._claims.items() if o != owner)
        best, start, previous, c = (0, 0), None, None, 0
        for block in sorted(self._free):
            while c < len(claimed) and claimed[c][1] <= block:
                c += 1
            if c < len(claimed) and claimed[c][0] <= block:
                continue  # inside another prompt's run
            if start is None or block != previous + 1:
                start = block
            previous = block
            if previous - start + 1 >= length:
                return start, length
            if previous - start + 1 > best[1]:
                best = (start, previous - start + 1)
        return best

    def _take_highest(self, count: int) -> list[int]:
        """count empty blocks, the highest first, skipping the heap's stale entries."""
        out = []
        while len(out) < count:
            block = -heapq.heappop(self._highest)
            if block in self._free:
                self._free.remove(block)
                out.append(block)
        return out

    def _release(self, block: int) -> None:
        self._free.add(block)
        heapq.heappush(self._highest, -block)
        # Drop stale entries now and then: blocks taken in place or from a run leave theirs behind
        if len(self._highest) > 4 * len(self._free) + 1024:
            self._highest = [-b for b in sorted(self._free, reverse=True)]

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block. A block nobody uses any more becomes free: evictable if it
        is cached, in the given order (so pass a request's blocks last position first: a prefix's
        tail is then evicted before its head, which every longer hit needs)."""
        for block in block_ids:
            if self._num_refs[block] <= 0:
                raise RuntimeError(f"block {block} is freed but not in use")
            self._num_refs[block] -= 1
            if self._num_refs[block]:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._release(block)

    # -- prefix cache --------------------------------------------------------------------------
    def cached_block(self, block_hash: bytes) -> int | None:
        """The block that holds the prefix of this hash, in use or not; None if none does."""
        return self._block_of.get(block_hash)

    def is_evictable(self, block: int) -> bool:
        """Whether the block is free and cached (taking it with `share` lowers num_free_blocks)."""
        return block in self._evictable

    def share(self, block_ids: Sequence[int]) -> None:
        """Add a reference to each cached block (a new request reuses it); a free one stops being
        evictable."""
        for block in block_ids:
            if block not in self._hash_of:
                raise RuntimeError(f"block {block} holds no cached prefix")
            self._evictable.pop(block, None)
            self._num_refs[block] += 1

    def cache(self, block: int, block_hash: bytes) -> None:
        """Index a block in use, whose tokens all have KV now, under its chained hash. A block that is
        already indexed, or a hash another block already holds (two requests computed the same
        prefix at once), changes nothing: that block stays uncached and is simply freed later."""
        if self._num_refs[block] <= 0:
            raise RuntimeError(f"block {block} is not in use")
        if block in self._hash_of or block_hash in self._block_of:
            return
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
