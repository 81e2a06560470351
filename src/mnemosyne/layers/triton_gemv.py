"""Matrix-vector product for one-row linears (batch-1 decode): y [1, N] = x [1, K] W[N, K]^T (+ b).
Bound by reading W once, so each program streams a block of W's rows with wide loads and reduces with
elementwise products and tl.sum; no tensor cores. Imported only on CUDA (or under TRITON_INTERPRET)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape: each program owns `block_n` output rows and walks its share of K in steps of
    `block_k` columns; `split_k` programs share a row block's K, their float32 partial sums added in
    a second launch in a fixed order (deterministic)."""

    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1

    @property
    def name(self) -> str:
        return f"n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.split_k}"


CONFIGS = {c.name: c for c in (
    GemvConfig(4, 1024, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(8, 1024, 4),
    GemvConfig(16, 512, 4),
    GemvConfig(16, 1024, 8),
    GemvConfig(32, 256, 4),
    GemvConfig(8, 512, 4, split_k=2),
    GemvConfig(8, 512, 4, split_k=4),
)}
"""The configurations `benchmarks/gpu_kernels.py --only gemv` times against cuBLAS, by name."""

_SUM_BLOCK = 1024


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n, k, k_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_PARTIAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IS_EVEN: tl.constexpr):
    """Program (i, s): rows [i * BLOCK_N, +BLOCK_N) over columns [s * k_per_split, +k_per_split).
    IS_PARTIAL: writes float32 partial sums [splits, n], without bias; else out [n], bias added.
    IS_EVEN: no row or column falls outside W, so no load is masked."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * k_per_split
    cols = k_start + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if IS_EVEN:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")  # read once: keep x in cache instead
            x = tl.load(x_ptr + cols + k0)
        else:
            col_mask = cols + k0 < k
            w = tl.load(w_ptrs + k0, mask=(rows[:, None] < n) & col_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + cols + k0, mask=col_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N] float32
    row_mask = rows < n
    if IS_PARTIAL:
        tl.store(out_ptr + tl.program_id(1) * n + rows, y, mask=row_mask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, n, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out [n] = sum of partial [SPLIT_K, n] over splits in order (+ bias), rounded once."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    y = tl.load(partial_ptr + rows, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        y += tl.load(partial_ptr + s * n + rows, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(n: int, k: int) -> GemvConfig:
    """The configuration `gemv` uses for W [n, k]: K up to 4096 in 1024-column steps with 4-row
    programs, longer K with 16-row programs of 8 warps, and a K that is not a multiple of 1024 in
    512-column steps with 8-row programs (no masked loads). Measured with `benchmarks/gpu_kernels.py
    --only gemv` on an H200 (`benchmarks/jobs/call34.txt`) at Llama-3-8B's four projections and their
    tp = 2 and 4 shards: this rule picks the fastest of CONFIGS at 10 of the 12, and is within 8% at the
    other two (o at tp = 1 and 2); it beats cuBLAS at all 12, by 1-39%. Splitting K never won, not even
    at the narrowest shard (q/k/v at tp = 4, 192 programs of 8 rows: 6.6 µs split in 2, 5.4 µs not)."""
    if k % 1024:
        return CONFIGS["n8_k512_w4_s1"]
    return CONFIGS["n4_k1024_w4_s1" if k <= 4096 else "n16_k1024_w8_s1"]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in out_dtype (default x's), as F.linear gives.

    x and weight: bf16 or fp16, one dtype, last axis contiguous (weight entirely); accumulated in float32
    and rounded once. config: the launch shape (None: `default_config`). Raises ValueError otherwise."""
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"gemv takes x [1, K] and a contiguous weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != k or x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemv takes one half-precision dtype and x's K equal to weight's: x {x.dtype} "
                         f"{tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    config = config or default_config(n, k)
    out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    split_k = min(config.split_k, triton.cdiv(k, config.block_k))
    k_per_split = triton.cdiv(triton.cdiv(k, config.block_k), split_k) * config.block_k
    is_even = n % config.block_n == 0 and k_per_split * split_k == k
    row_blocks = triton.cdiv(n, config.block_n)
    has_bias = bias is not None
    partial = torch.empty(split_k, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _gemv_kernel[(row_blocks, split_k)](
        x, weight, bias if has_bias else weight, partial, n, k, k_per_split, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, IS_PARTIAL=split_k > 1, HAS_BIAS=has_bias, IS_EVEN=is_even,
        num_warps=config.num_warps)
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(n, _SUM_BLOCK),)](partial, bias if has_bias else partial, out, n,
                                                          SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=_SUM_BLOCK)
    return out
