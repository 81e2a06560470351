"""The attention backend seam: per-step metadata, the (out, lse) protocol, the exact LSE merge
and the fused KV write shared by all backends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each request's new tokens sit in the flat batch, and where its KV lives.

    Request i owns query rows [query_start_loc[i], query_start_loc[i+1]); its new tokens are the
    last rows of its sequence, so query row j sits at position seq_lens[i] - num_new + j.
    """

    query_start_loc: tuple[int, ...]
    """Host offsets into the flat token batch, length num_requests + 1."""
    seq_lens: tuple[int, ...]
    """KV length of each request after this step's tokens are written."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot (block_id * block_size + offset) of each new token."""
    kv_slots: tuple[torch.Tensor, ...]
    """Per request, [seq_len] int64: cache slots of all its tokens, in position order."""

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)


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


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Backend by name; 'auto' picks the fastest exact one available for the device."""
    if name == "reference":
        from mnemosyne.attention.reference import ReferenceBackend

        return ReferenceBackend()
    from mnemosyne.attention.sdpa import SdpaBackend

    return SdpaBackend()
