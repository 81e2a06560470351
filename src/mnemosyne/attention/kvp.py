"""KV-cache parallelism in attention: every KVP group attends over its own shard of a long request's
KV, then the partial (out, lse) of that request's rows are gathered over the KVP group and merged
exactly. This is KVP's only collective; its traffic is proportional to the step's new tokens of
multi-group requests, never to their context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata, merge_attention
from mnemosyne.distributed.comm import Group

GATHER_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256)
"""Gather sizes of decode-sized steps: a CUDA graph is captured per (batch, gather) bucket."""


def gather_size(num_gathered: int) -> int:
    """Rows of the KVP gather for a step with num_gathered multi-group tokens: those plus one spare row
    (where a graph's rows that belong to no multi-group request write), rounded up to a bucket for
    decode-sized steps. Every group computes it from the plan alone, so the gather has the same shape
    on every group, whether it replays a CUDA graph or runs eagerly."""
    return next((b for b in GATHER_BUCKETS if b > num_gathered), num_gathered + 1)


@dataclass(frozen=True)
class KvpRows:
    """A step's rows of requests that span several KVP groups, as one group sees them.

    Every group gathers the same `num_tokens` rows: all multi-group tokens of the plan, in plan order,
    then padding. A group where such a request is not active (not onboarded yet) holds no row for it
    and sends lse = -inf there, which the merge ignores.

    Two forms: eager steps name the multi-group rows (`local_rows`); CUDA graphs, whose shapes are
    fixed, take every row of the batch (`local_rows` None) and mark the multi-group ones (`is_multi`),
    the others pointing at the spare last row.
    """

    num_tokens: int
    """Rows of the gather: `gather_size` of the plan's multi-group tokens."""
    local_rows: torch.Tensor | None
    """[A] int64: rows of this group's flat batch that belong to multi-group requests; None: all rows."""
    gather_rows: torch.Tensor
    """[A] (or [T], every row) int64: the rows' places in the gather, in [0, num_tokens)."""
    is_multi: torch.Tensor | None = None
    """[T] bool when local_rows is None: the rows that belong to multi-group requests."""


class KvpAttention:
    """An attention backend over this group's KV shard, merged over the KVP group where metadata says
    a row belongs to a multi-group request. Steps without such rows pass straight through."""

    def __init__(self, inner: AttentionBackend, kvp_group: Group):
        self.inner = inner
        self.kvp_group = kvp_group
        self.supports_cuda_graphs = getattr(inner, "supports_cuda_graphs", False)
        """The merge has static shapes in its graph form (`KvpRows.is_multi`), so graphs capture it."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if meta.num_requests:
            out, lse = self.inner.forward(q, k_cache, v_cache, meta, scale)
        else:  # nothing local, but the group still joins the gather of other groups' rows
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)
        if meta.kvp is None:
            return out, lse
        return merge_over_group(out, lse, meta.kvp, self.kvp_group.all_gather_stacked)

    def warm_up_merge(self, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the merge's eager form (rows named, `KvpRows.local_rows`) before serving: the CUDA
        graphs compile only the graph form, and the first step with a multi-group prefill stalled
        for the compile (283 ms against a 26 ms prediction, call54). The gather is stood in for by
        copies of this group's own part, so no rank waits for another here."""
        if device.type != "cuda":
            return
        size = self.kvp_group.size
        out = torch.zeros(4, num_heads, head_dim, dtype=dtype, device=device)
        lse = torch.zeros(4, num_heads, dtype=torch.float32, device=device)
        local = torch.tensor([1, 3], device=device)
        rows = KvpRows(gather_size(2), local, torch.arange(2, device=device))
        merge_over_group(out, lse, rows, lambda part: part.expand(size, *part.shape).contiguous())


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, rows: KvpRows,
                     all_gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace, in place, the multi-group rows of this group's partial out [T, H, D] and lse [T, H]
    float32 by the exact merge of every group's partials (one all-gather of [num_tokens, H, D + 1]
    float32: `all_gather` stacks them in group-rank order); returns (out, lse). No host
    synchronisation: CUDA graphs capture it."""
    num_heads, head_dim = out.shape[1], out.shape[2]
    part = out.new_empty(rows.num_tokens, num_heads, head_dim + 1, dtype=torch.float32)
    part[..., head_dim] = float("-inf")  # rows this group does not hold; their out part is never read
    if out.is_cuda:  # one launch to pack, one to merge (the groups as the splits of the decode merge)
        from mnemosyne.attention.triton_decode import merge_splits_into, pack_rows

        pack_rows(out, lse, part, rows.local_rows, rows.gather_rows)
        parts = all_gather(part)  # [kvp, num_tokens, H, D + 1], in group-rank order
        merge_splits_into(parts[..., :head_dim].permute(1, 2, 0, 3), parts[..., head_dim].permute(1, 2, 0),
                          out, lse, rows.gather_rows, rows.local_rows, rows.is_multi)
        return out, lse
    mine = slice(None) if rows.local_rows is None else rows.local_rows
    part[rows.gather_rows, :, :head_dim] = out[mine].float()
    part[rows.gather_rows, :, head_dim] = lse[mine]
    parts = all_gather(part)
    merged_out, merged_lse = merge_attention(list(parts[..., :head_dim]), list(parts[..., head_dim]))
    merged_out, merged_lse = merged_out[rows.gather_rows].to(out.dtype), merged_lse[rows.gather_rows]
    if rows.is_multi is None:
        out[mine], lse[mine] = merged_out, merged_lse
    else:  # every row went through the gather; the spare row's merge is garbage, and dropped here
        out.copy_(torch.where(rows.is_multi[:, None, None], merged_out, out))
        lse.copy_(torch.where(rows.is_multi[:, None], merged_lse, lse))
    return out, lse
