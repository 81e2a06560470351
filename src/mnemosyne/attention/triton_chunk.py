"""Paged attention for short chunks in Triton: one launch for every short chunk of a step, each over
its request's whole context (cached prefix and, causally, the chunk itself), split along the context
so that one chunk over a long prefix still fills every SM. cuDNN puts one program on each 128 query
rows of a kv head, so a short chunk gave it 8 programs for 132 SMs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mnemosyne.attention.backend import AttentionMetadata
from mnemosyne.attention.triton_decode import MAX_SPLIT_TOKENS, attend_pages, merge_splits
from mnemosyne.host_copy import to_device

_LOG2E = 1.4426950408889634
_MAX_BLOCK_M = 128
"""Most query rows per program: a taller tile's fp32 accumulator spills registers; more rows of a kv
head take several programs over the same keys, read again from L2."""

_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
            for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
"""12 configurations, tuned at start-up for each of 4 tile heights (`GpuBackend.warm_up`): every
configuration is a compile, on a fresh machine, so the list stays short."""


# no compile per new split or row-block count (lse's strides follow the split count): see triton_decode.py
@triton.jit(do_not_specialize=["num_splits", "row_blocks", "stride_bt", "stride_lt", "stride_lh"])
def _paged_chunks_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, chunks_ptr, o_ptr, lse_ptr, scale_log2, num_splits, row_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    kv_head = tl.program_id(0) // row_blocks
    row_block = tl.program_id(0) % row_blocks
    split = tl.program_id(1)
    chunk = chunks_ptr + tl.program_id(2) * 6  # one row of ShortChunks.table
    table = block_tables_ptr + tl.load(chunk).to(tl.int64) * stride_bt
    num_keys = tl.load(chunk + 1)
    first_pos = tl.load(chunk + 2)
    q_start = tl.load(chunk + 3)
    num_new = tl.load(chunk + 4)
    out_start = tl.load(chunk + 5)

    # Rows are (token, q head of this kv head), token-major: a token's GROUP heads are adjacent in q.
    r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token = r // GROUP
    heads = kv_head * GROUP + r % GROUP
    live = token < num_new
    last_key = first_pos + token  # causal: query j sits at position first_pos + j
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + token).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
                + d[None, :], mask=live[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    # splits are cut at 128-token multiples whatever BLOCK_N is, so every config sees the same keys per split
    span = tl.cdiv(tl.cdiv(num_keys, 128), num_splits) * 128
    start = split * span
    end = tl.minimum(start + span, num_keys)
    end = tl.where(row_block * BLOCK_M < num_new * GROUP, end, start)  # a row block past this chunk reads nothing

    out, lse = attend_pages(q, table, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, kv_head,
                            start, end, last_key, scale_log2, BLOCK_M, HEAD_DIM, PAGE, BLOCK_N, True)
    rows = (out_start + token).to(tl.int64)
    tl.store(o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + split * stride_os + d[None, :],
             out, mask=live[:, None])
    tl.store(lse_ptr + rows * stride_lt + heads * stride_lh + split, lse, mask=live)


# Tuned once per tile height on first use, then cached. Triton's CPU interpreter cannot time configs,
# so it runs one fixed config.
_tuned_chunks_kernel = triton.autotune(configs=_CONFIGS, key=["GROUP", "HEAD_DIM", "PAGE", "BLOCK_M"])(
    _paged_chunks_kernel)


@dataclass(frozen=True)
class ShortChunks:
    """Chunks attended together by one launch; their outputs are stacked in the order of `requests`."""

    requests: tuple[int, ...]
    """Indices of the chunks in the step's metadata."""
    table: torch.Tensor
    """[len(requests), 6] int32 on the device, per chunk: block-table row, number of keys (its context
    [0, num_keys) in that row's pages), position of its first query (query j sees keys up to
    first + j), first row in q, number of queries, first row in the output."""
    num_queries: int
    """Rows of the output: the chunks' new tokens."""
    max_new: int
    """Most new tokens of one chunk; sets the programs' tile height."""
    max_keys: int
    """Longest context of one chunk; sets the splits."""


def short_chunks(meta: AttentionMetadata, requests: Sequence[int]) -> ShortChunks:
    """The given chunks of a step as the kernel reads them. A prefix-only request (a KVP group's
    earlier shard) lets every query see all its seq_len keys; any other sees its prefix and,
    causally, its own new tokens. One host-to-device copy, no synchronisation."""
    rows, num_queries = [], 0
    for i in requests:
        q_start, num_new = meta.query_start_loc[i], meta.query_start_loc[i + 1] - meta.query_start_loc[i]
        seq_len = meta.seq_lens[i]
        sees_all = bool(meta.is_prefix_only) and meta.is_prefix_only[i]
        rows.append((meta.host_rows[i], seq_len, seq_len - 1 if sees_all else seq_len - num_new, q_start,
                     num_new, num_queries))
        num_queries += num_new
    table = to_device(torch.tensor(rows, dtype=torch.int32).reshape(-1, 6), meta.slot_mapping.device)
    return ShortChunks(tuple(requests), table, num_queries, max((r[4] for r in rows), default=0),
                       max((r[1] for r in rows), default=0))


def _row_tiles(group: int, max_new: int) -> tuple[int, int]:
    """(rows per program, programs per kv head) for up to group × max_new query rows per kv head;
    at least 16 rows, the smallest tl.dot."""
    rows = group * max_new
    block_m = min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))
    return block_m, triton.cdiv(rows, block_m)


def chunk_splits(chunks: ShortChunks, num_heads: int, num_kv_heads: int, num_sms: int,
                 programs_per_sm: int = 4) -> int:
    """Splits that give about programs_per_sm programs per SM and keep every split under
    MAX_SPLIT_TOKENS, each at least 512 keys and 8 keys per query row of its tile: a split writes
    fp32 partials of its rows, which then stay under an eighth of the K/V it reads."""
    block_m, row_blocks = _row_tiles(num_heads // num_kv_heads, chunks.max_new)
    wanted = math.ceil(programs_per_sm * num_sms / max(1, len(chunks.requests) * num_kv_heads * row_blocks))
    wanted = max(wanted, math.ceil(chunks.max_keys / MAX_SPLIT_TOKENS))
    return max(1, min(wanted, 128, math.ceil(chunks.max_keys / max(512, 8 * block_m))))


def paged_chunks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 chunks: ShortChunks, page_size: int, scale: float,
                 num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] (the step's queries; the chunks' rows are read in place); caches [num_slots, Hkv, D]
    with the chunks' own K/V already stored; block_tables [max_rows, max_pages] int32.

    Returns out [chunks.num_queries, Hq, D] (q's dtype) and lse [chunks.num_queries, Hq] float32,
    the chunks' rows stacked; a query that sees no key gets out 0 and lse -inf. No host synchronisation.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    o = torch.empty(chunks.num_queries, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(chunks.num_queries, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_m, row_blocks = _row_tiles(group, chunks.max_new)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kernel, fixed = (_paged_chunks_kernel, {"BLOCK_N": 32}) if interpreted else (_tuned_chunks_kernel, {})
    kernel[(num_kv_heads * row_blocks, num_splits, len(chunks.requests))](
        q, k_cache, v_cache, block_tables, chunks.table, o, lse, scale * _LOG2E, num_splits, row_blocks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page_size, BLOCK_M=block_m, **fixed,
    )
    if num_splits == 1:
        return o[:, :, 0].to(q.dtype), lse[:, :, 0]
    return merge_splits(o, lse, q.dtype)
