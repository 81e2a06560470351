"""Fused elementwise kernels for the GPU: residual add + RMSNorm, SiLU × up, and rotary in place.
Each replaces five to ten torch kernels, which at decode sizes cost more than the bytes they move.
Imported only on CUDA; the CPU path keeps plain torch ops with the same math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, n_cols,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the model dtype first, as an unfused `x + residual` would be
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] -> (rms_norm(x + residual) * weight, x + residual); residual None: (norm(x), x)."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(n_rows,)](x, residual if residual is not None else x, weight, out, res_out, eps, n_cols,
                                    HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols))
    return out, res_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # round SiLU to the model dtype before the product, as F.silu(gate) * up does
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up) -> silu(gate) * up [T, I]."""
    n_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, inv_freq_ptr, stride_t, stride_h, attention_factor,
                   HALF: tl.constexpr, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF)
    mask = heads[:, None] < NUM_HEADS
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freqs = pos * tl.load(inv_freq_ptr + d)  # [HALF], float32 as the reference computes it
    cos = (tl.cos(freqs) * attention_factor).to(x_ptr.dtype.element_ty).to(tl.float32)
    sin = (tl.sin(freqs) * attention_factor).to(x_ptr.dtype.element_ty).to(tl.float32)
    base = x_ptr + t * stride_t + heads[:, None] * stride_h
    x1 = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    # the reference rounds each product before adding: q * cos + rotate_half(q) * sin
    a1 = (x1 * cos[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    b1 = (-x2 * sin[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    a2 = (x2 * cos[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    b2 = (x1 * sin[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(base + d[None, :], (a1 + b1).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + d[None, :], (a2 + b2).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> None:
    """Rotate x [T, H, D] in place (neox layout: halves, not interleaved pairs)."""
    num_tokens, num_heads, head_dim = x.shape
    _rotary_kernel[(num_tokens,)](x, positions, inv_freq, x.stride(0), x.stride(1), attention_factor,
                                  HALF=head_dim // 2, NUM_HEADS=num_heads,
                                  HEADS_PAD=triton.next_power_of_2(num_heads))
