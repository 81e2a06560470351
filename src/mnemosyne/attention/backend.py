"""The attention backend seam: per-step metadata, the (out, lse) protocol, the exact LSE merge
and the fused KV write shared by all backends."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from mnemosyne.attention.kvp import KvpRows


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each request's new tokens sit in the flat batch, and where its KV lives.

    Request i owns query rows [query_start_loc[i], query_start_loc[i+1]); its new tokens are the
    last rows of its sequence, so query row j sits at position seq_lens[i] - num_new + j (unless
    is_prefix_only[i]: then every query sees all seq_lens[i] keys). The first num_decodes requests
    have exactly one new token each.
    """

    query_start_loc: tuple[int, ...]
    """Host offsets into the flat token batch, length num_requests + 1."""
    seq_lens: tuple[int, ...]
    """KV length of each request after this step's tokens are written."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot (page_id * page_size + offset) of each new token."""
    block_tables: torch.Tensor
    """[max_rows, max_pages] int32: page ids, one row per live request (shared, not per step)."""
    rows: torch.Tensor
    """[num_requests] int32: each request's row in block_tables."""
    seq_lens_tensor: torch.Tensor
    """[num_requests] int32: seq_lens on the device."""
    page_size: int
    num_decodes: int = 0
    prefix_runs: tuple[tuple[tuple[int, int], ...], ...] = ()
    """Per request, slot ranges [start, end) of its cached prefix (tokens before this step), for
    backends that read contiguous stretches as views; empty for decodes."""
    host_rows: tuple[int, ...] = ()
    """rows on the host."""
    decode_splits: int | None = None
    """Fixed context splits for the decode kernel (CUDA graphs need a static grid); None picks per step."""
    is_prefix_only: tuple[bool, ...] = ()
    """Per request (empty: none is): its queries sit after all seq_lens[i] cached keys and see every
    one of them, and none of its new tokens' K/V is here (their slot_mapping is a scratch slot): a KVP
    group holding a full earlier shard of the request. prefix_runs then cover the whole shard."""
    kvp: KvpRows | None = None
    """Rows of requests that span several KVP groups, merged over the KVP group after attention
    (attention/kvp.py); None when the step has none. Backends themselves ignore it."""

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    @functools.cached_property
    def kv_slots(self) -> tuple[torch.Tensor, ...]:
        """Per request, [seq_len] int64 cache slots of all its tokens in position order (gather backends)."""
        offsets = torch.arange(self.page_size, device=self.slot_mapping.device)
        out = []
        for row, seq_len in zip(self.host_rows, self.seq_lens, strict=True):
            pages = self.block_tables[row, : -(-seq_len // self.page_size)].long()
            out.append((pages.unsqueeze(1) * self.page_size + offsets).flatten()[:seq_len])
        return tuple(out)


def build_metadata(requests: Sequence[tuple[int, int, Sequence[int]]], page_size: int,
                   device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for a batch given as (seq_len, num_new, page_ids) per request, in batch order.

    For tests, the profiler and other callers without a runner; the runner builds the same thing
    incrementally from its persistent block tables.
    """
    max_pages = max(len(pages) for _, _, pages in requests)
    tables = torch.zeros(len(requests), max(1, max_pages), dtype=torch.int32)
    query_start, slots, runs = [0], [], []
    for row, (seq_len, num_new, pages) in enumerate(requests):
        if len(pages) * page_size < seq_len:
            raise ValueError(f"request {row}: {len(pages)} pages cannot hold {seq_len} tokens")
        tables[row, : len(pages)] = torch.tensor(list(pages), dtype=torch.int32)
        positions = torch.arange(seq_len - num_new, seq_len)
        slots.append(tables[row, positions // page_size].long() * page_size + positions % page_size)
        query_start.append(query_start[-1] + num_new)
        runs.append(_slot_runs(pages, seq_len - num_new, page_size) if num_new > 1 else ())
    num_decodes = next((i for i, (_, n, _) in enumerate(requests) if n != 1), len(requests))
    seq_lens = tuple(seq_len for seq_len, _, _ in requests)
    return AttentionMetadata(
        query_start_loc=tuple(query_start), seq_lens=seq_lens, slot_mapping=torch.cat(slots).to(device),
        block_tables=tables.to(device), rows=torch.arange(len(requests), dtype=torch.int32, device=device),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device), page_size=page_size,
        num_decodes=num_decodes, prefix_runs=tuple(runs), host_rows=tuple(range(len(requests))))


def _slot_runs(pages: Sequence[int], num_tokens: int, page_size: int) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for page in pages[: -(-num_tokens // page_size)]:
        if runs and runs[-1][1] == page * page_size:
            runs[-1][1] += page_size
        else:
            runs.append([page * page_size, (page + 1) * page_size])
    if runs:  # the last page may be partly filled
        runs[-1][1] -= -(-num_tokens // page_size) * page_size - num_tokens
    return tuple((a, b) for a, b in runs)


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of the batch's new queries over each request's cached KV.

        q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_slots, num_kv_heads, head_dim]
        with this step's K/V already stored. Returns out [num_tokens, num_heads, head_dim] in q's
        dtype and lse [num_tokens, num_heads] float32, the natural-log sum of exp(scores).
        Mutates nothing.
        """
        ...


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V [num_tokens, num_kv_heads, head_dim] into their slots: one indexed copy each."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of partial attention over disjoint key sets.

    outs[i]: [..., head_dim]; lses[i]: [...] float32. A part with lse = -inf (no keys) contributes
    nothing. Returns the merged (out, lse) as if attention had run over the union of keys.
    """
    lse_stack = torch.stack([lse.float() for lse in lses])  # [parts, ...]
    lse = torch.logsumexp(lse_stack, dim=0)
    # Rows where every part is empty stay -inf; weight them 0 rather than NaN.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe_lse)  # [parts, ...]
    # An empty part may carry NaN out (a 0/0 softmax); select rather than multiply by its 0 weight.
    out = sum(torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * o.float(), 0.0)
              for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype), lse


def select_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   triton_chunk_rows: int | None = None, cudnn_ragged: bool = False) -> AttentionBackend:
    """Backend by name; 'auto' picks the fastest exact one for the device and dtype: the Triton and
    cuDNN kernels on a GPU in bf16/fp16, torch's fused CPU kernel on CPU, the reference otherwise.
    triton_chunk_rows: the GPU backend's split between its chunk kernels (None: its default);
    cudnn_ragged: whether the process runs cuDNN's ragged path (EngineConfig.cudnn_ragged)."""
    if name == "auto":
        if device.type == "cuda":
            name = "gpu" if dtype in (torch.bfloat16, torch.float16) else "reference"
        else:
            name = "sdpa"
    if name == "reference":
        from mnemosyne.attention.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "gpu":
        from mnemosyne.attention.gpu import SMALL_CHUNK_ROWS, GpuBackend

        rows = SMALL_CHUNK_ROWS if triton_chunk_rows is None else triton_chunk_rows
        return GpuBackend(small_chunk_rows=rows, cudnn_ragged=cudnn_ragged)
    from mnemosyne.attention.sdpa import SdpaBackend

    return SdpaBackend()
