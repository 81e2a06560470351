"""Chained hashes of full KV blocks, the keys of the prefix cache: block i's hash stands for the
token ids at positions [0, (i + 1) · block_size), so two requests with equal hashes for block i
have the same KV in it.

Why the hash alone decides a hit (no token comparison): it is BLAKE2b with a 256-bit digest over
(the previous block's digest, this block's int32 token ids). A false hit needs two different
prefixes with the same digest. Among n distinct block prefixes ever hashed the chance of any such
pair is below n² / 2²⁵⁷: even 2⁵⁰ blocks (far more than any engine lifetime) give under 2⁻¹⁵⁶. A
client crafting prompts to poison another's cache would have to find a BLAKE2b-256 collision, about
2¹²⁸ work with no known shortcut. Python's built-in `hash` (64 bits, not collision resistant) would
allow both, so it is not used. Comparing tokens on every hit instead would cost O(prefix) host time
per admission and a copy of every cached block's token ids.
"""

from __future__ import annotations

import hashlib
from array import array

HASH_BYTES = 32
"""Digest width: 256 bits (see the module docstring for why that width)."""

_ROOT = b"mnemosyne-prefix-cache-v1"
"""The 'previous digest' of block 0."""


def extend_block_hashes(hashes: list[bytes], token_ids: array, block_size: int, num_blocks: int) -> None:
    """Append to `hashes` (the chain for the first len(hashes) blocks of token_ids) until it covers
    num_blocks full blocks. token_ids is array('i'); each block costs O(block_size)."""
    if num_blocks * block_size > len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens hold no {num_blocks} full blocks of {block_size}")
    parent = hashes[-1] if hashes else _ROOT
    for i in range(len(hashes), num_blocks):
        digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
        digest.update(token_ids[i * block_size:(i + 1) * block_size].tobytes())
        parent = digest.digest()
        hashes.append(parent)
