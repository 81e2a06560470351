"""The MLP's gate/up projection with SiLU × up in the GEMM's epilogue, for GPUs with TMA (Hopper on).

Unfused, a prefill chunk of T tokens writes the [T, 2I] gate/up product (1.9 GB at 32K tokens of
Llama-3-8B), reads it back and writes [T, I]: 0.96 ms a layer at 32K tokens on an H100, beside an
11 ms GEMM. Here the weight's gate and up rows alternate in blocks of BLOCK_N (`ColumnParallelLinear`'s
`interleave`), so one output tile of 2 × BLOCK_N columns holds gate and up for the same BLOCK_N
features, and only silu(gate) * up is stored. The rounding is the unfused path's: gate and up rounded
to the model dtype as the GEMM's output would be, SiLU rounded before the product (on an H100, call111:
the same bits as cuBLAS and the separate kernel, at 1,000, 4,096 and 16,384 rows).

A persistent kernel over TMA descriptors: one program per SM walks the output tiles in grouped order
(GROUP_M rows of tiles share their weight tiles in L2). One dot per k-step over the whole 2 × BLOCK_N
tile ran as fast as cuBLAS (692 against 693 TFLOP/s at the power limit); two dots, one for each half,
ran at 512 (call109).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_N = 128
"""Features per output tile, and the block in which the weight's gate and up rows alternate."""
BLOCK_M, BLOCK_K, GROUP_M, NUM_STAGES, NUM_WARPS = 128, 64, 8, 3, 8
"""Measured on an H100 at [32768, 4096] x 28672 (`benchmarks/swiglu_gemm.py`): four stages of these tiles
do not fit in shared memory."""

FUSED_SWIGLU_MIN_ROWS = 1024
"""Inputs of fewer rows keep cuBLAS and the separate SiLU × up kernel (`benchmarks/swiglu_gemm.py`)."""


@functools.cache
def _device(index: int) -> tuple[bool, int]:
    """(whether the device has TMA: compute capability 9.0 or later, its SM count)."""
    props = torch.cuda.get_device_properties(index)
    return props.major >= 9, props.multi_processor_count


def _index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs compute capability 9.0+, 16-byte aligned rows and contiguous operands."""
    return (x.is_cuda and _device(_index(x))[0]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()
            and (x.shape[1] * x.element_size()) % 16 == 0 and weight.shape[0] % (2 * BLOCK_N) == 0)


@triton.jit
def _tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group_m), (tile % in_group) // group_m


@triton.jit(do_not_specialize=["M"])
def _gate_up_silu_kernel(x_desc, w_desc, out_desc, M, N2, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N2, 2 * BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = out_desc.dtype
    # the epilogue's tile index is counted apart from the loop's, as triton's persistent matmul does
    # (a value used both before and after the pipelined inner loop upsets the software pipeliner)
    tile_out = start - NUM_SMS
    for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            acc = tl.dot(x_desc.load([pid_m * BLOCK_M, kk * BLOCK_K]),
                         w_desc.load([pid_n * 2 * BLOCK_N, kk * BLOCK_K]).T, acc)
        tile_out += NUM_SMS
        pid_m, pid_n = _tile(tile_out, num_pid_m, num_pid_n, GROUP_M)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        # rounded as the unfused path rounds: the GEMM's output, then SiLU, then the product
        g = gate.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (act * up.to(dtype).to(tl.float32)).to(dtype))


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] and the gate/up weight [2I, K], its gate and up rows alternating in blocks of BLOCK_N ->
    silu(x Wg^T) * (x Wu^T) [T, I]."""
    num_rows, k = x.shape
    n2 = weight.shape[0]
    out = torch.empty(num_rows, n2 // 2, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    num_sms = _device(_index(x))[1]
    tiles = triton.cdiv(num_rows, BLOCK_M) * (n2 // (2 * BLOCK_N))
    _gate_up_silu_kernel[(min(num_sms, tiles),)](
        TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K]), TensorDescriptor.from_tensor(weight, [2 * BLOCK_N, BLOCK_K]),
        TensorDescriptor.from_tensor(out, [BLOCK_M, BLOCK_N]), num_rows, n2, k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, NUM_SMS=num_sms, num_stages=NUM_STAGES, num_warps=NUM_WARPS)
    return out
