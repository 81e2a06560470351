"""KV-cache parallelism in attention: every KVP group attends over its own shard of a long request's
KV, then the partial (out, lse) of that request's rows are gathered over the KVP group and merged
exactly. This is KVP's only collective; its traffic is proportional to the step's new tokens of
multi-group requests, never to their context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata, merge_attention
from mnemosyne.distributed.comm import Group


@dataclass(frozen=True)
class KvpRows:
    """A step's rows of requests that span several KVP groups, as one group sees them.

    Every group gathers the same `num_tokens` rows: all multi-group tokens of the plan, in plan order.
    A group where such a request is not active (not onboarded yet) holds no row for it and sends
    lse = -inf there, which the merge ignores.
    """

    num_tokens: int
    local_rows: torch.Tensor
    """[A] int64: rows of this group's flat batch that belong to multi-group requests."""
    gather_rows: torch.Tensor
    """[A] int64: the same rows' places in the gather, in [0, num_tokens)."""


class KvpAttention:
    """An attention backend over this group's KV shard, merged over the KVP group where metadata says
    a row belongs to a multi-group request. Steps without such rows pass straight through."""

    def __init__(self, inner: AttentionBackend, kvp_group: Group):
        self.inner = inner
        self.kvp_group = kvp_group
        self.supports_cuda_graphs = getattr(inner, "supports_cuda_graphs", False)
        """Decode graphs capture steps without multi-group rows only (the runner checks `meta.kvp`)."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if meta.num_requests:
            out, lse = self.inner.forward(q, k_cache, v_cache, meta, scale)
        else:  # nothing local, but the group still joins the gather of other groups' rows
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)
        if meta.kvp is None:
            return out, lse
        return merge_over_group(out, lse, meta.kvp, self.kvp_group)


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, rows: KvpRows,
                     group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace, in place, the multi-group rows of this group's partial out [T, H, D] and lse [T, H]
    float32 by the exact merge of every group's partials (one all-gather of [num_tokens, H, D + 1]
    float32); returns (out, lse)."""
    num_heads, head_dim = out.shape[1], out.shape[2]
    part = torch.zeros(rows.num_tokens, num_heads, head_dim + 1, dtype=torch.float32, device=out.device)
    part[..., head_dim] = float("-inf")
    part[rows.gather_rows, :, :head_dim] = out[rows.local_rows].float()
    part[rows.gather_rows, :, head_dim] = lse[rows.local_rows]
    parts = group.all_gather(part.unsqueeze(0), dim=0)  # [kvp, num_tokens, H, D + 1], in group-rank order
    merged_out, merged_lse = merge_attention(list(parts[..., :head_dim]), list(parts[..., head_dim]))
    out[rows.local_rows] = merged_out[rows.gather_rows].to(out.dtype)
    lse[rows.local_rows] = merged_lse[rows.gather_rows]
    return out, lse
