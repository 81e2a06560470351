"""Exact LSE merge of two partial attention results in one pass (the torch version takes about a
dozen passes over fp32 copies, which showed up as 10% of a long prefill)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows"])  # no compile per new row count pattern
def _merge_pair_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, out_l_ptr, n_rows,
                       HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    live = rows < n_rows
    l1 = tl.load(l1_ptr + rows, mask=live, other=float("-inf"))
    l2 = tl.load(l2_ptr + rows, mask=live, other=float("-inf"))
    top = tl.maximum(l1, l2)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w1 = tl.exp(l1 - top_safe)
    w2 = tl.exp(l2 - top_safe)
    total = w1 + w2
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    offs = rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    o1 = tl.load(o1_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
    out = o1 * (w1 * inv)[:, None] + o2 * (w2 * inv)[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live[:, None])
    tl.store(out_l_ptr + rows, tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)),
                                        float("-inf")), mask=live)


def merge_pair(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
               lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o [..., D] (same shape, any float dtype), lse [...] float32 -> merged (o in o1's dtype, lse)."""
    head_dim = o1.shape[-1]
    o1, o2 = o1.contiguous(), o2.contiguous()
    lse1, lse2 = lse1.contiguous().float(), lse2.contiguous().float()
    out = torch.empty_like(o1)
    out_lse = torch.empty_like(lse1)
    n_rows = lse1.numel()
    rows = 16
    _merge_pair_kernel[(triton.cdiv(n_rows, rows),)](o1, lse1, o2, lse2, out, out_lse, n_rows,
                                                     HEAD_DIM=head_dim, ROWS=rows)
    return out, out_lse
