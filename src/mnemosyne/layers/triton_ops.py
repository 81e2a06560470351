"""Fused elementwise kernels for the GPU: residual add + RMSNorm, SiLU × up, and rotary with the KV write.
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
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, block, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_cols = (cols // block) * 2 * block + cols % block
    gate = tl.load(x_ptr + row * 2 * n_cols + gate_cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + gate_cols + block, mask=mask, other=0.0).to(tl.float32)
    # round SiLU to the model dtype before the product, as F.silu(gate) * up does
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up [T, I]: gate then up, or alternating in blocks of `block` columns."""
    n_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    tile = 1024
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, tile))](gate_up, out, n_cols, block or n_cols, BLOCK=tile)
    return out


@triton.jit
def _rotate(src, dst, heads, d, mask, cos, sin, HALF: tl.constexpr):
    """Rotate [heads, 2 * HALF] at src and write it to dst, rounding each product as the reference does."""
    x1 = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    a1 = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    b1 = (-x2 * sin[None, :]).to(dtype).to(tl.float32)
    a2 = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    b2 = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(dst + d[None, :], (a1 + b1).to(dtype), mask=mask)
    tl.store(dst + HALF + d[None, :], (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch,
                         stride_ot, stride_oh, attention_factor, HALF: tl.constexpr, NUM_HEADS: tl.constexpr, Q_HEADS: tl.constexpr,
                         NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr):
    """Program (t, 0) writes token t's k and v into the caches; program (t, p > 0) rotates its q heads
    (p - 1) * Q_HEADS onwards into q_out. A decode step's one token is then a few programs, not one."""
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freqs = pos * tl.load(inv_freq_ptr + d)  # float32, as the reference computes it
    cos = (tl.cos(freqs) * attention_factor).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = (tl.sin(freqs) * attention_factor).to(q_ptr.dtype.element_ty).to(tl.float32)
    if part == 0:
        slot = tl.load(slot_ptr + t)
        kv_heads = tl.arange(0, KV_HEADS_PAD)
        kv_mask = kv_heads[:, None] < NUM_KV_HEADS
        k_dst = k_cache_ptr + slot * stride_ct + kv_heads[:, None] * stride_ch
        _rotate(k_ptr + t * stride_kt + kv_heads[:, None] * stride_kh, k_dst, kv_heads, d, kv_mask, cos, sin, HALF)
        dd = tl.arange(0, 2 * HALF)
        v = tl.load(v_ptr + t * stride_vt + kv_heads[:, None] * stride_vh + dd[None, :], mask=kv_mask, other=0.0)
        tl.store(v_cache_ptr + slot * stride_ct + kv_heads[:, None] * stride_ch + dd[None, :], v, mask=kv_mask)
    else:
        heads = (part - 1) * Q_HEADS + tl.arange(0, Q_HEADS)
        _rotate(q_ptr + t * stride_qt + heads[:, None] * stride_qh,
                q_out_ptr + t * stride_ot + heads[:, None] * stride_oh, heads, d, heads[:, None] < NUM_HEADS, cos, sin,
                HALF)


def rotary_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, attention_factor: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """Write rotated k and v [T, Hkv, D] into the caches [slots, Hkv, D] at slot_mapping [T]; return q
    [T, Hq, D] rotated. Neox layout (halves). One launch instead of rotary, rotary, copy, copy.

    q usually arrives as a view into the fused qkv projection's rows; the rotated q is written packed
    into a new tensor (the same traffic as rotating in place), the sequence-major layout that cuDNN's
    attention reads without a copy."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    q_heads = min(8, triton.next_power_of_2(num_heads))
    _rotary_store_kernel[(num_tokens, 1 + triton.cdiv(num_heads, q_heads))](
        q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, q_out, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), q_out.stride(0),
        q_out.stride(1), attention_factor,
        HALF=head_dim // 2, NUM_HEADS=num_heads, Q_HEADS=q_heads,
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads))
    return q_out
