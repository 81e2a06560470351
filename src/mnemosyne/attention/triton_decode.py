"""Paged decode attention in Triton: one launch for a whole batch of single-token queries over
each request's block table, split along the context (flash-decoding) so even one request keeps
every SM busy. Returns (out, lse) like every backend; the splits are merged exactly by LSE."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
            for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]


@triton.jit
def attend_pages(q, table, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, kv_head, start, end,
                 last_key, scale_log2, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The paged online softmax both Triton kernels run: q [ROWS, HEAD_DIM] (scaled by scale_log2 into
    log2 units) over the keys at positions [start, end) of one kv head, read through a request's
    block-table row `table`. With CAUSAL, row r sees keys up to position last_key[r] only.

    Returns out [ROWS, HEAD_DIM] float32, normalised, and lse [ROWS] (natural log); a row that sees
    no key gets out 0 and lse -inf."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(table + t // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + t % PAGE
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                    mask=valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [ROWS, BLOCK_N], log2 units
        if CAUSAL:
            s = tl.where(valid[None, :] & (t[None, :] <= last_key[:, None]), s, float("-inf"))
        else:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    return out, lse


# Triton compiles a kernel again for each new (== 1, % 16 == 0) pattern of its integer arguments; those
# that follow the split count (lse's strides are multiples of it) must not be specialised on, or the
# first eager step with, say, 20 splits after warm-up met only powers of two stalls for a compile
@triton.jit(do_not_specialize=["num_splits", "split_class", "min_span", "stride_bt", "stride_lb", "stride_lh"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, rows_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    scale_log2, num_splits, split_class, min_span,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    table = block_tables_ptr + tl.load(rows_ptr + b).to(tl.int64) * stride_bt
    # splits are cut at 128-token multiples whatever BLOCK_N is, so every config sees the same keys per split
    # no split shorter than min_span: a short row takes fewer programs than a long one in the same grid
    span = tl.maximum(min_span, tl.cdiv(tl.cdiv(seq_len, 128), num_splits) * 128)
    start = split * span
    end = tl.minimum(start + span, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < GROUP, other=0.0)  # [GROUP_PAD, HEAD_DIM]
    out, lse = attend_pages(q, table, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, kv_head,
                            start, end, start, scale_log2, GROUP_PAD, HEAD_DIM, PAGE, BLOCK_N, False)
    keep = g < GROUP
    # an empty split writes only its lse (-inf, which the merge skips); split 0 always writes, so a
    # single split, or a padding row, reads back zeros
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out,
             mask=keep[:, None] & ((start < end) | (split == 0)))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=keep)


# Tuned once per shape and split class on first use (the warm-up before CUDA-graph capture covers
# every class), then cached. The split count is a runtime argument: as a constant, every new count an
# eager step met compiled and timed all configurations again, seconds in the middle of serving. Triton's
# CPU interpreter cannot time configs, so it runs one fixed config.
_tuned_decode_kernel = triton.autotune(configs=_CONFIGS, key=["GROUP", "HEAD_DIM", "PAGE", "split_class"])(
    _paged_decode_kernel)

MAX_SPLIT_CLASS = 7


def split_class(num_splits: int) -> int:
    """The decode kernel's tuning class of a split count: its bit length (1, 2-3, 4-7, …, 64 and up),
    few enough that `GpuBackend.warm_up` tunes every class before serving."""
    return min(num_splits.bit_length(), MAX_SPLIT_CLASS)


MAX_SPLITS = 256
"""Most splits of a row. Few rows of few kv heads need this many to give the SMs about four programs
each: one row over 2 kv heads (tp=4 of an 8-kv-head model) had 256 programs with 128 splits and read
its 1M-token KV at 81% of the copy rate on an H200, where 8 kv heads × 66 splits read at 92–95%."""

MAX_SPLIT_TOKENS = 16384
"""Longest stretch of one request's context a single program walks: a long request batched with
many short ones would otherwise be read by one program per head (a profile measured 838 ms for
256 decodes with one 512K context, against 23 ms for the same KV spread evenly)."""


PROGRAMS_PER_SM = 4
"""Decode programs a step aims to give each SM."""


def num_splits_for(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                   programs_per_sm: int = PROGRAMS_PER_SM, by_length: bool = True) -> int:
    """Splits that give about programs_per_sm programs per SM and, when by_length, keep every
    split of the longest request under MAX_SPLIT_TOKENS; none shorter than 512 tokens."""
    wanted = math.ceil(programs_per_sm * num_sms / max(1, batch * num_kv_heads))
    if by_length:
        wanted = max(wanted, math.ceil(max_seq_len / MAX_SPLIT_TOKENS))
    return max(1, min(wanted, MAX_SPLITS, math.ceil(max_seq_len / 512)))


DECODE_MIN_SPAN = 1024
"""Shortest stretch of context one split of a row walks, in a batch whose rows alone fill the SMs
(`decode_min_span`): its short rows then use few of the splits and its long rows many. With
SPAN_TOKENS below, the best or tied-best split policy on every batch that
`benchmarks/gpu_kernels.py --only scattered` timed on an H200 (2026-11-21): a 64K row among 63 of
1K read in 0.210 ms against 0.710 ms with splits from the batch size alone, 137 scattered contexts
0.449 against 0.512 ms, uniform and single-row batches unchanged."""

SPAN_TOKENS = 2048
"""An eager step gives its longest row at least one split per this many tokens, or per its share of
the batch's work (`decode_splits`), whichever is longer."""

GRAPH_PROGRAMS = 16384
"""A CUDA graph's splits are fixed when it is captured, before it meets any context: as many as keep
its grid (batch × kv heads × splits) within this many programs. The splits a row does not need
(DECODE_MIN_SPAN) exit at once."""


def decode_min_span(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """DECODE_MIN_SPAN once the batch's rows give a program per SM, else 128 (one tile): a lone
    short row is then still spread over the SMs."""
    return DECODE_MIN_SPAN if batch * num_kv_heads >= num_sms else 128


def decode_splits(batch: int, num_kv_heads: int, longest: int, num_sms: int, total: int | None = None) -> int:
    """Splits of a decode step over rows of `total` tokens in all (default: batch × longest), the
    longest `longest`: enough programs to fill the SMs (four an SM), and enough splits that the
    longest row's spans are no longer than the batch's work per program, nor than SPAN_TOKENS;
    with `decode_min_span`, short rows use few of them. A lone long row then gets the splits that
    fill the SMs, not one per SPAN_TOKENS: 66 splits read one 256K-1M-token row 4-7% faster than 128
    or 256 on an H200 (`gpu_kernels.py --only splits`, in CUDA graphs), and a 64K row among 63 of 1K
    still gets 32, where the batch size alone gives 2."""
    by_batch = num_splits_for(batch, num_kv_heads, longest, num_sms, by_length=False)
    total = batch * longest if total is None else total
    share = -(-total * num_kv_heads // (PROGRAMS_PER_SM * num_sms))  # tokens a program walks, balanced
    return max(1, min(MAX_SPLITS, max(by_batch, -(-longest // max(SPAN_TOKENS, share)))))


def graph_decode_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits baked into a decode graph of this batch size (see GRAPH_PROGRAMS)."""
    by_batch = num_splits_for(batch, num_kv_heads, max_seq_len, num_sms, by_length=False)
    by_programs = min(128, GRAPH_PROGRAMS // (batch * num_kv_heads))  # beyond 128 only if the SMs need it
    min_span = decode_min_span(batch, num_kv_heads, num_sms)
    return max(1, min(MAX_SPLITS, -(-max_seq_len // min_span), max(by_batch, by_programs)))


def graph_split_variants(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> tuple[int, ...]:
    """Splits of one batch bucket's decode graphs, fewest first: what the batch size alone asks for,
    the powers of two above it, and `graph_decode_splits`. A step replays the fewest that are at least
    what an eager step would choose (`graph_variant`). One graph with the most splits for every step
    cost a batch of 64 short rows 0.07 ms a layer on an H200 (32 splits against 2), and the powers
    of two avoid counts that tile badly (18 splits read 8 × 32K 30% slower than 16 or 17;
    benchmarks/gpu_kernels.py --only splits, 2026-11-21)."""
    most = graph_decode_splits(batch, num_kv_heads, max_seq_len, num_sms)
    least = min(most, num_splits_for(batch, num_kv_heads, max_seq_len, num_sms, by_length=False))
    powers = (1 << k for k in range(1, MAX_SPLITS.bit_length()))
    return tuple(sorted({least, most, *(p for p in powers if least < p < most)}))


def graph_variant(variants: tuple[int, ...], splits: int, longest: int) -> int | None:
    """The splits of the graph that a decode step replays when an eager one would use `splits`, or
    None to run it eagerly: its longest row too long for even the most (MAX_SPLIT_TOKENS a split)."""
    if longest > variants[-1] * MAX_SPLIT_TOKENS:
        return None
    return next((v for v in variants if v >= splits), variants[-1])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 rows: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
                 num_splits: int, min_span: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D]; caches [num_slots, Hkv, D]; block_tables [max_rows, max_pages] int32 with request b's
    pages in row rows[b]; seq_lens [B] int32 (0 for padding rows, which get out 0 and lse -inf).
    Each row's context is cut into num_splits spans, none shorter than min_span tokens (a multiple
    of 128), so with min_span a short row uses fewer of the grid's splits than a long one.

    Returns out [B, Hq, D] (q's dtype) and lse [B, Hq] float32. No host synchronisation.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kernel, fixed = (_paged_decode_kernel, {"BLOCK_N": 32}) if interpreted else (_tuned_decode_kernel, {})
    kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, rows, seq_lens, o, lse, scale * _LOG2E, num_splits,
        split_class(num_splits), min_span, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page_size,
        **fixed,
    )
    if num_splits == 1:
        return o[:, :, 0].to(q.dtype), lse[:, :, 0]
    return merge_splits(o, lse, q.dtype)


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "num_splits"])  # as the decode kernel's
def _merge_splits_kernel(o_ptr, lse_ptr, out_ptr, out_lse_ptr, src_ptr, dst_ptr, keep_ptr,
                         stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
                         stride_outb, stride_outh, stride_olb, stride_olh, num_heads, num_splits,
                         INDIRECT: tl.constexpr, HAS_DST: tl.constexpr, HAS_KEEP: tl.constexpr,
                         SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    i = tl.program_id(0) // num_heads
    h = tl.program_id(0) % num_heads
    src = i.to(tl.int64)
    dst = i.to(tl.int64)
    if INDIRECT:  # row i merges row src_rows[i] of the splits into row dst_rows[i] of the output
        src = tl.load(src_ptr + i).to(tl.int64)
        if HAS_DST:
            dst = tl.load(dst_ptr + i).to(tl.int64)
    keep = i >= 0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + i) != 0
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + src * stride_lb + h * stride_lh + s * stride_ls, mask=s < num_splits,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top_safe)  # 0 for empty splits
    total = tl.sum(w, 0)
    # an empty split's out is never read: it may be unwritten, or NaN (0/0)
    o = tl.load(o_ptr + src * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=((s < num_splits) & (w > 0))[:, None], other=0.0)
    out = tl.sum(tl.where(w[:, None] > 0, o * w[:, None], 0.0), 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + dst * stride_outb + h * stride_outh + d, out.to(out_ptr.dtype.element_ty),
             mask=keep & (d < HEAD_DIM))
    tl.store(out_lse_ptr + dst * stride_olb + h * stride_olh,
             tl.where(total > 0, top_safe + tl.log(total), float("-inf")), mask=keep)


def merge_splits(o: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge along the split axis in one launch (a Python loop over splits would cost a few
    kernels per split per layer). The split count is a runtime argument: a new count mid-serving
    compiles nothing unless its power-of-two padding is new.

    o [B, H, S, D] fp32 and lse [B, H, S] fp32, any strides but a contiguous last axis of o
    -> out [B, H, D] in dtype, lse [B, H]."""
    batch, num_heads, _, head_dim = o.shape
    out = torch.empty(batch, num_heads, head_dim, dtype=dtype, device=o.device)
    out_lse = torch.empty(batch, num_heads, dtype=torch.float32, device=o.device)
    _launch_merge(o, lse, out, out_lse, batch, None, None, None)
    return out, out_lse


def merge_splits_into(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor,
                      src_rows: torch.Tensor, dst_rows: torch.Tensor | None = None,
                      keep: torch.Tensor | None = None) -> None:
    """KVP's merge over its groups (the S axis), written in place: for each i, the merge of row
    src_rows[i] of o [N, H, S, D] / lse [N, H, S] goes to row dst_rows[i] (default i) of out [T, H, D]
    and out_lse [T, H], where keep[i] (default everywhere). One launch replaces the gather, cast,
    select and copies that would follow a plain merge: about ten kernels per layer."""
    _launch_merge(o, lse, out, out_lse, src_rows.shape[0], src_rows, dst_rows, keep)


@triton.jit
def _pack_rows_kernel(out_ptr, lse_ptr, part_ptr, src_ptr, dst_ptr, stride_ot, stride_oh, stride_lt, stride_lh,
                      stride_pt, stride_ph, num_heads, HAS_SRC: tl.constexpr, HEAD_DIM: tl.constexpr):
    i = tl.program_id(0) // num_heads
    h = tl.program_id(0) % num_heads
    src = i.to(tl.int64)
    if HAS_SRC:
        src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(out_ptr + src * stride_ot + h * stride_oh + d).to(tl.float32)
    tl.store(part_ptr + dst * stride_pt + h * stride_ph + d, o)
    tl.store(part_ptr + dst * stride_pt + h * stride_ph + HEAD_DIM, tl.load(lse_ptr + src * stride_lt + h * stride_lh))


def pack_rows(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, src_rows: torch.Tensor | None,
              dst_rows: torch.Tensor) -> None:
    """KVP's gather buffer, filled in one launch: part[dst_rows[i], :, :D] = out[src_rows[i]] in float32
    and part[dst_rows[i], :, D] = lse[src_rows[i]] (src_rows None: row i). out [T, H, D], lse [T, H],
    part [N, H, D + 1] float32 with a contiguous last axis."""
    num_rows, num_heads, head_dim = dst_rows.shape[0], out.shape[1], out.shape[2]
    if num_rows == 0:
        return
    _pack_rows_kernel[(num_rows * num_heads,)](
        out, lse, part, dst_rows if src_rows is None else src_rows, dst_rows, out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1), part.stride(0), part.stride(1), num_heads,
        HAS_SRC=src_rows is not None, HEAD_DIM=head_dim)


def _launch_merge(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor, num_rows: int,
                  src_rows: torch.Tensor | None, dst_rows: torch.Tensor | None, keep: torch.Tensor | None) -> None:
    num_heads, num_splits, head_dim = o.shape[1], o.shape[2], o.shape[3]
    if num_rows == 0:
        return
    dummy = out_lse  # an unread pointer for absent index tensors
    _merge_splits_kernel[(num_rows * num_heads,)](
        o, lse, out, out_lse, dummy if src_rows is None else src_rows, dummy if dst_rows is None else dst_rows,
        dummy if keep is None else keep,
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out_lse.stride(0), out_lse.stride(1), num_heads, num_splits,
        INDIRECT=src_rows is not None, HAS_DST=dst_rows is not None, HAS_KEEP=keep is not None,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim)
