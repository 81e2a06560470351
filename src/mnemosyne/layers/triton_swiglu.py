"""The MLP's gate/up projection with SiLU × up in the GEMM's epilogue, for Hopper and later GPUs.

Unfused, a prefill chunk of T tokens writes the [T, 2I] gate/up product (1.9 GB at 32K tokens of
Llama-3-8B), reads it back and writes [T, I]: about 1 ms of memory traffic per layer and chunk beside
a 12 ms GEMM. Here each program computes a [BLOCK_M, BLOCK_N] tile of gate and the same tile of up
(two accumulators over the weight's gate rows n and up rows I + n, so the weight keeps its layout) and
stores only silu(gate) * up. The rounding is the unfused path's: gate and up rounded to the model dtype
as the GEMM's output would be, SiLU rounded before the product.

A persistent kernel over TMA descriptors: NUM_SMS programs walk the output tiles in grouped order
(GROUP_M rows of tiles share their weight tiles in L2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class SwigluConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_stages: int = 3
    num_warps: int = 8
    warp_specialize: bool = False


DEFAULT = SwigluConfig()

FUSED_SWIGLU_MIN_ROWS = 1024
"""Inputs of fewer rows keep cuBLAS and the separate SiLU × up kernel (`benchmarks/swiglu_gemm.py`)."""


@functools.cache
def _has_tma(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs compute capability 9.0+, 16-byte aligned rows and contiguous operands."""
    return (x.is_cuda and _has_tma(x.device.index if x.device.index is not None else torch.cuda.current_device())
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()
            and (x.shape[1] * x.element_size()) % 16 == 0 and (weight.shape[0] // 2 * x.element_size()) % 16 == 0)


@triton.jit
def _tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group_m), (tile % in_group) // group_m


@triton.jit(do_not_specialize=["M"])
def _gate_up_silu_kernel(x_desc, w_desc, out_desc, M, INTER, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(INTER, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = out_desc.dtype
    # the epilogue's tile index is counted apart from the loop's, as triton's persistent matmul does
    # (a value used both before and after the pipelined inner loop upsets the software pipeliner)
    tile_out = start - NUM_SMS
    for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            off_k = kk * BLOCK_K
            a = x_desc.load([off_m, off_k])
            gate = tl.dot(a, w_desc.load([off_n, off_k]).T, gate)
            up = tl.dot(a, w_desc.load([INTER + off_n, off_k]).T, up)
        tile_out += NUM_SMS
        pid_m, pid_n = _tile(tile_out, num_pid_m, num_pid_n, GROUP_M)
        # rounded as the unfused path rounds: the GEMM's output, then SiLU, then the product
        g = gate.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (act * up.to(dtype).to(tl.float32)).to(dtype))


_NUM_SMS: dict[int, int] = {}


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: SwigluConfig = DEFAULT) -> torch.Tensor:
    """x [T, K] and the fused weight [2I, K] (gate rows, then up rows) -> silu(x Wg^T) * (x Wu^T) [T, I]."""
    num_rows, k = x.shape
    inter = weight.shape[0] // 2
    out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    c = config
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(num_rows, c.block_m) * triton.cdiv(inter, c.block_n)
    num_sms = _NUM_SMS[device]
    _gate_up_silu_kernel[(min(num_sms, tiles),)](
        TensorDescriptor.from_tensor(x, [c.block_m, c.block_k]),
        TensorDescriptor.from_tensor(weight, [c.block_n, c.block_k]),
        TensorDescriptor.from_tensor(out, [c.block_m, c.block_n]),
        num_rows, inter, k, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        NUM_SMS=num_sms, WARP_SPECIALIZE=c.warp_specialize, num_stages=c.num_stages, num_warps=c.num_warps)
    return out
