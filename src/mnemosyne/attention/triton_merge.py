"""Exact LSE merge of any number of partial attention results in one pass (a long chunk's causal part and
its prefix pieces). The torch version took about a dozen passes over fp32 copies per pair, which showed
up as 10% of a long prefill; merged a pair at a time, each pass still read and wrote a float32 running
result."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_PARTS = 16
"""Parts one `merge_parts` launch takes: a chunk's causal part and the pieces of a prefix of up to
8M tokens (`gpu.run_pieces`: powers of two from 1024 keys, and the rest). More are merged in rounds."""


# one compile for every chunk length and part count (the lse strides follow the chunk length)
@triton.jit(do_not_specialize=["n_rows", "num_parts", "stride_lc", "stride_lh"])
def _merge_parts_kernel(o_ptrs, l_ptrs, out_ptr, out_l_ptr, n_rows, num_parts, num_heads,
                        stride_oc, stride_oh, stride_lc, stride_lh,
                        MAX: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    live = rows < n_rows
    c = (rows // num_heads).to(tl.int64)
    h = (rows % num_heads).to(tl.int64)
    l_offs = c * stride_lc + h * stride_lh
    o_offs = (c * stride_oc + h * stride_oh)[:, None] + d[None, :]
    top = tl.full((ROWS,), float("-inf"), tl.float32)
    for i in tl.static_range(MAX):
        if i < num_parts:
            top = tl.maximum(top, tl.load(l_ptrs[i] + l_offs, mask=live, other=float("-inf")))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    for i in tl.static_range(MAX):
        if i < num_parts:
            w = tl.exp(tl.load(l_ptrs[i] + l_offs, mask=live, other=float("-inf")) - top_safe)  # 0: empty part
            o = tl.load(o_ptrs[i] + o_offs, mask=live[:, None] & (w > 0)[:, None], other=0.0).to(tl.float32)
            acc += o * w[:, None]
            total += w
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    out_offs = rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    tl.store(out_ptr + out_offs, (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=live[:, None])
    tl.store(out_l_ptr + rows, tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)),
                                        float("-inf")), mask=live)


def merge_parts(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of any number of partial attention results over disjoint keys, in one pass:
    each part is read once, the sum is kept in float32 and rounded to dtype once. Merged two at a
    time through a float32 running result, a chunk over a 700K-1M prefix (its causal part and 5-8
    power-of-two pieces) spent 0.23-0.47 ms a layer merging (an H200, `benchmarks/prefix_pieces.py`,
    call58): about 1.5 s of each stage's busy time in a 1M prefill at pp=4, nearly all that the
    fastest stage spent beyond its GEMMs and attention. In one pass, 0.11-0.21 ms (call59).

    outs: [C, H, D] each, with a contiguous last axis; lses: [C, H] float32 each (any strides; a
    part that differs in strides from the first is copied). Returns out [C, H, D] in dtype and lse
    [C, H] float32, both contiguous."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_parts needs as many lses as outs, at least one: got {len(outs)} and {len(lses)}")
    if len(outs) > MAX_PARTS:  # in rounds, the running result in float32
        out, lse = merge_parts(outs[:MAX_PARTS], lses[:MAX_PARTS], torch.float32)
        return merge_parts([out, *outs[MAX_PARTS:]], [lse, *lses[MAX_PARTS:]], dtype)
    if outs[0].stride(-1) != 1 or any(o.stride() != outs[0].stride() for o in outs):
        outs = [o.contiguous() for o in outs]
    lses = [lse.float() for lse in lses]  # no copy when they are float32 already
    if any(lse.stride() != lses[0].stride() for lse in lses):
        lses = [lse.contiguous() for lse in lses]
    num_rows, num_heads, head_dim = outs[0].shape
    out = torch.empty(num_rows, num_heads, head_dim, dtype=dtype, device=outs[0].device)
    out_lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=outs[0].device)
    n_rows = num_rows * num_heads
    if n_rows == 0:
        return out, out_lse
    pad = MAX_PARTS - len(outs)  # unread: the kernel stops at num_parts
    rows = 16
    _merge_parts_kernel[(triton.cdiv(n_rows, rows),)](
        (*outs, *[outs[0]] * pad), (*lses, *[lses[0]] * pad), out, out_lse, n_rows, len(outs), num_heads,
        outs[0].stride(0), outs[0].stride(1), lses[0].stride(0), lses[0].stride(1),
        MAX=MAX_PARTS, HEAD_DIM=head_dim, ROWS=rows)
    return out, out_lse
