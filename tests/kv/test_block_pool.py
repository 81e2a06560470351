"""The block pool's prefix-cache bookkeeping and the chained block hashes. No model."""

from __future__ import annotations

from array import array

import pytest

from mnemosyne.kv.block_hash import HASH_BYTES, extend_block_hashes
from mnemosyne.kv.block_pool import BlockPool


def hashes_of(tokens: list[int], block_size: int = 4) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, array("i", tokens), block_size, len(tokens) // block_size)
    return out


def test_a_block_hash_stands_for_its_whole_prefix():
    a = hashes_of([1, 2, 3, 4, 5, 6, 7, 8])
    b = hashes_of([9, 2, 3, 4, 5, 6, 7, 8])  # same second block, different first one
    assert all(len(h) == HASH_BYTES == 32 for h in a)  # 256 bits: see block_hash.py for why
    assert a[0] != b[0] and a[1] != b[1]
    assert hashes_of([1, 2, 3, 4, 5, 6, 7, 9])[0] == a[0]  # a later difference leaves earlier blocks equal
    assert hashes_of([1, 2, 3, 4, 5, 6, 7, 8, 10, 11]) == a  # only full blocks are hashed


def test_hashes_extend_incrementally_to_the_same_chain():
    tokens = array("i", range(40))
    step: list[bytes] = []
    for n in (1, 3, 3, 10):
        extend_block_hashes(step, tokens, 4, n)
    assert step == hashes_of(list(range(40)))
    with pytest.raises(ValueError, match="no 11 full blocks"):
        extend_block_hashes(step, tokens, 4, 11)


def test_cached_free_blocks_count_as_free_and_are_evicted_least_recently_freed_first():
    pool = BlockPool(4, 16)
    a, b, c = pool.allocate(3)
    for block, h in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.cache(block, h)
    pool.free([c, a])  # freed in this order: c is evicted first
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 3
    (empty,) = pool.allocate(1)  # the never-cached block goes first
    assert pool.num_evictions == 0 and empty not in (a, b, c)
    assert pool.allocate(1) == [c]
    assert pool.num_evictions == 1 and pool.cached_block(b"c") is None
    assert pool.cached_block(b"a") == a and pool.cached_block(b"b") == b


def test_a_block_in_use_is_never_evicted():
    pool = BlockPool(3, 16)
    used, cached, _ = pool.allocate(3)
    pool.cache(used, b"used")
    pool.cache(cached, b"cached")
    pool.free([cached])
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks with 1 free"):
        pool.allocate(2)
    assert pool.allocate(1) == [cached]
    assert pool.cached_block(b"used") == used  # still indexed, still in use


def test_sharing_counts_references_and_revives_an_evictable_block():
    pool = BlockPool(2, 16)
    (block, _) = pool.allocate(2)
    pool.cache(block, b"h")
    pool.share([block])  # a second request reuses it while the first still runs
    pool.free([block])
    assert not pool.is_evictable(block) and pool.num_free_blocks == 0
    pool.free([block])
    assert pool.is_evictable(block) and pool.num_free_blocks == 1
    pool.share([block])  # reused after both finished: no longer evictable
    assert not pool.is_evictable(block) and pool.num_free_blocks == 0
    with pytest.raises(RuntimeError, match="holds no cached prefix"):
        pool.share([1 - block])


def test_a_duplicate_prefix_is_not_indexed_twice_and_misuse_is_refused():
    pool = BlockPool(3, 16)
    first, second, _ = pool.allocate(3)
    pool.cache(first, b"h")
    pool.cache(second, b"h")  # computed at the same time by another request: stays uncached
    assert pool.cached_block(b"h") == first
    pool.free([second])
    assert not pool.is_evictable(second) and pool.num_free_blocks == 1
    with pytest.raises(RuntimeError, match="freed but not in use"):
        pool.free([second])
    with pytest.raises(RuntimeError, match="not in use"):
        pool.cache(second, b"other")


def test_a_request_grows_in_place_and_short_ones_take_the_top():
    pool = BlockPool(16, 4)
    long = pool.allocate(3, run=5, owner="long")  # a long prompt: the start of a run that holds it
    short = pool.allocate(2)  # everything else: the highest, ascending
    assert long == [0, 1, 2] and short == [14, 15]
    assert pool.allocate(2, after=long[-1]) == [3, 4]  # the long prompt's next chunk, right after it
    assert pool.allocate(1, after=short[-1]) == [13]  # nothing after 15: the highest left
    pool.free([4])
    assert pool.allocate(3, after=3) == [4, 5, 6]  # a freed block is empty again, and taken in place
    pool.free([14, 15])
    assert pool.allocate(3) == [12, 14, 15]  # free: 7..12, 14, 15
    assert pool.allocate(2, after=6) == [7, 8]
    assert pool.num_free_blocks == 3 and pool.allocate(3) == [9, 10, 11]


def test_long_prompts_claim_the_lowest_run_that_holds_them():
    pool = BlockPool(32, 4)
    pool.free(pool.allocate(3, run=3, owner="s")[:2])  # block 2 stays in use: 0, 1 is a short hole
    pool.unclaim("s")
    a = pool.allocate(2, run=10, owner="a")  # the lowest run of 10 empty blocks starts at 3
    b = pool.allocate(2, run=6, owner="b")  # 5..12 is empty but a's: b starts after a's run
    assert a == [3, 4] and b == [13, 14]
    assert pool.allocate(2, after=4) == [5, 6]  # a grows in place
    assert pool.allocate(1, run=40, owner="c") == [19]  # no run of 40: the longest outside the claims
    assert pool.allocate(1) == [31]  # claims are soft: the top is taken as ever
    pool.unclaim("a")  # a's unused 7..12 is open to others again
    assert pool.allocate(1, run=8, owner="d") == [7]  # the longest: 7..12, not 0, 1


def test_stale_heap_entries_stay_bounded():
    pool = BlockPool(100, 4)
    for _ in range(3000):  # blocks taken in place leave stale entries in the heap of highest blocks
        pool.free(pool.allocate(1, after=41) if 42 in pool._free else pool.allocate(1))
    assert len(pool._highest) <= 4 * 100 + 1024 + 1
    assert pool.allocate(100) == list(range(100))
