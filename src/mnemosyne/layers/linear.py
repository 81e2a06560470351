"""Megatron-style linears. Column-parallel shards output features, row-parallel shards input
features and all-reduces; fused QKV and gate-up keep each part's shard contiguous per rank.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies this rank's slice of
a full HF tensor, so loaders stay ignorant of the parallel layout. Built with `one_row_gemv` (from
--triton-gemv), a linear sends one-row inputs (batch-1 decode) to the Triton GEMV instead of cuBLAS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mnemosyne.distributed.comm import SINGLE, Group

_HAS_MM_OUT_DTYPE = "out_dtype" in (torch.mm.__doc__ or "")
"""torch.mm(..., out_dtype=float32) on half-precision CUDA inputs (torch 2.8 and later)."""

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, one_row_gemv: bool = False) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T (+ bias) -> [T, out] in out_dtype: None (x's) or float32 (straight
    from the accumulator, as `matmul_float32`, and then without bias). With one_row_gemv, a single
    contiguous half-precision CUDA row goes to the Triton GEMV (`layers/triton_gemv.py`); else torch's."""
    if (one_row_gemv and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.is_contiguous()):
        from mnemosyne.layers.triton_gemv import gemv

        return gemv(x, weight, bias, out_dtype)
    if out_dtype == torch.float32:
        return matmul_float32(x, weight)
    return F.linear(x, weight, bias)


def _param(shape: Sequence[int], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by rows (output features) across the tp group; no communication.

    `output_sizes` lists the fused parts (e.g. gate and up); each is sharded on its own so a rank
    holds [gate_shard; up_shard]. With `interleave` B (parts of one size, a multiple of B per rank), the
    rank's parts alternate in blocks of B rows instead: [gate 0:B; up 0:B; gate B:2B; up B:2B; …], so
    that a GEMM tile of 2B output features holds both parts of B of them (`layers/triton_swiglu.py`).
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False, group: Group = SINGLE,
                 one_row_gemv: bool = False, interleave: int | None = None):
        super().__init__()
        self.group = group
        self.one_row_gemv = one_row_gemv
        self.shard_sizes = [_divide(n, group.size, "output features") for n in output_sizes]
        if interleave is not None and (len(set(self.shard_sizes)) != 1 or self.shard_sizes[0] % interleave):
            raise ValueError(f"cannot interleave parts of {self.shard_sizes} rows in blocks of {interleave}")
        self.interleave = interleave
        self.weight = _param((sum(self.shard_sizes), input_size), self._load)
        self.bias = _param((sum(self.shard_sizes),), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.shard_sizes[shard_id]
        rows = loaded.narrow(0, self.group.rank * size, size)
        if self.interleave is None:
            param.data.narrow(0, sum(self.shard_sizes[:shard_id]), size).copy_(rows)
            return
        block, parts = self.interleave, len(self.shard_sizes)
        param.data.view(-1, parts, block, *param.shape[1:])[:, shard_id].copy_(rows.reshape(-1, block, *rows.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, one_row_gemv=self.one_row_gemv)


class QKVParallelLinear(nn.Module):
    """Fused q/k/v projection sharded by heads. With fewer kv heads than tp ranks, each kv head is
    replicated on tp_size / num_kv_heads consecutive ranks (the ranks whose q heads use it)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, group: Group = SINGLE, one_row_gemv: bool = False):
        super().__init__()
        self.group = group
        self.one_row_gemv = one_row_gemv
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, group.size, "attention heads")
        if num_kv_heads >= group.size:
            self.num_kv_heads = _divide(num_kv_heads, group.size, "kv heads")
            self.kv_head_start = group.rank * self.num_kv_heads
        else:
            _divide(group.size, num_kv_heads, "tensor-parallel size over kv heads")
            self.num_kv_heads = 1
            self.kv_head_start = group.rank * num_kv_heads // group.size
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.sizes = (q, kv, kv)
        self.weight = _param((q + 2 * kv, hidden_size), self._load)
        self.bias = _param((q + 2 * kv,), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        index = "qkv".index(shard_id)
        size, offset = self.sizes[index], sum(self.sizes[:index])
        head_start = self.group.rank * self.num_heads if shard_id == "q" else self.kv_head_start
        rows = loaded.narrow(0, head_start * self.head_dim, size)
        param.data.narrow(0, offset, size).copy_(rows)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return linear(x, self.weight, self.bias, one_row_gemv=self.one_row_gemv).split(self.sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T: W split by columns (input features), all-reduced.

    With `reduce_float32` (the default), half-precision partial sums stay in float32 through the
    all-reduce and are rounded once, as one device's GEMM rounds its float32 accumulator once. Summed
    in bf16, every output would be rounded twice more at tp=2, enough to flip a greedy token at a
    0.03-nat near-tie of a random-weight 8B model against tp=1. The price: 1.5 times the bytes of a
    bf16 all-reduce for large prefill chunks (`Group.sum_rounded`), 2 times for decode-sized steps,
    which are latency-bound and do not notice.
    """

    def __init__(self, input_size: int, output_size: int, group: Group = SINGLE, reduce_float32: bool = True,
                 one_row_gemv: bool = False):
        super().__init__()
        self.group = group
        self.one_row_gemv = one_row_gemv
        self.shard_size = _divide(input_size, group.size, "input features")
        self.weight = _param((output_size, self.shard_size), self._load)
        self.reduce_float32 = reduce_float32 and group.size > 1

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        param.data.copy_(loaded.narrow(1, self.group.rank * self.shard_size, self.shard_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce_float32 and x.dtype in (torch.bfloat16, torch.float16):
            return self.group.sum_rounded(linear(x, self.weight, out_dtype=torch.float32,
                                                 one_row_gemv=self.one_row_gemv), x.dtype)
        return self.group.all_reduce(linear(x, self.weight, one_row_gemv=self.one_row_gemv))


def matmul_float32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T in float32, straight from the GEMM's accumulator where torch
    has it (CUDA), else computed in float32."""
    if x.is_cuda and _HAS_MM_OUT_DTYPE and x.dtype != torch.float32:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())
