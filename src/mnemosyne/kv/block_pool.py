"""A pool of fixed-size KV blocks shared by all requests of one KV group, with the prefix cache's
bookkeeping: a reference count per block and an index from block hash (kv/block_hash.py) to the
block that holds that prefix.

A block is in exactly one of three states: in use (reference count > 0), free and cached (count
0, still indexed by its hash, evictable), or free and empty. Cached free blocks count as free:
`allocate` takes empty blocks first and then evicts cached ones, least recently freed first. A
block in use is never evicted, so eviction can never touch a running request's KV.

Where empty blocks go: a request's KV should sit in few runs of consecutive blocks, because a long
prompt's later chunks attend to its earlier ones run by run (one cuDNN call per run and layer). So a
request grows in place (`after`: its last block) while the blocks there are empty, prompts that take
several chunks take the lowest empty blocks, and everything else (prompts of one chunk, decode
growth) the highest, in ascending order. Short requests then come and go at the top while a long
prompt grows at the bottom, instead of cutting it into a run per chunk.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: give it more memory (--kv-cache-memory)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: set[int] = set(range(num_blocks))
        """Free blocks that hold no cached prefix."""
        self._lowest: list[int] = list(range(num_blocks))
        self._highest: list[int] = [-b for b in reversed(range(num_blocks))]
        """Min-heaps over _free (of ids, of negated ids) with stale entries, skipped when popped."""
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

    def allocate(self, num_blocks: int, after: int | None = None, low: bool = True) -> list[int]:
        """Take num_blocks free blocks: the empty ones right after block `after` (a request's last),
        then the lowest empty ones (low) or the highest (not low, returned in ascending order), then
        cached ones, least recently freed first. Raises RuntimeError if there are not enough (check
        first)."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks with {self.num_free_blocks} free")
        out = []
        if after is not None:
            block = after + 1
            while len(out) < num_blocks and block in self._free:
                self._free.remove(block)
                out.append(block)
                block += 1
        rest = min(num_blocks - len(out), len(self._free))
        out.extend(self._take(self._lowest, 1, rest) if low else sorted(self._take(self._highest, -1, rest)))
        while len(out) < num_blocks:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.num_evictions += 1
            out.append(block)
        for block in out:
            self._num_refs[block] = 1
        return out

    def _take(self, heap: list[int], sign: int, count: int) -> list[int]:
        """count empty blocks off one of the heaps (sign -1: the one of negated ids), skipping stale entries."""
        out = []
        while len(out) < count:
            block = sign * heapq.heappop(heap)
            if block in self._free:
                self._free.remove(block)
                out.append(block)
        return out

    def _release(self, block: int) -> None:
        self._free.add(block)
        heapq.heappush(self._lowest, block)
        heapq.heappush(self._highest, -block)
        # Drop stale entries now and then; each heap only loses them when popped itself
        if max(len(self._lowest), len(self._highest)) > 4 * len(self._free) + 1024:
            self._lowest = sorted(self._free)
            self._highest = [-b for b in reversed(self._lowest)]

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
