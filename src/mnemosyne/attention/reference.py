"""Reference attention: explicit scores, mask and softmax in float32, one request at a time.
Slow and obviously correct; every other backend is tested against it."""

from __future__ import annotations

import torch

from mnemosyne.attention.backend import AttentionMetadata


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           q_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, Hq, D] at absolute q_positions [Lq]; k, v [Lk, Hk, D] at positions 0..Lk-1.

    Returns out [Lq, Hq, D] (q's dtype) and lse [Lq, Hq] float32. Causal: a query sees keys at
    positions <= its own.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    masked = key_pos.unsqueeze(0) > q_positions.unsqueeze(1)  # [Lq, Lk]
    scores.masked_fill_(masked.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out.to(q.dtype), lse.transpose(0, 1).contiguous()


class ReferenceBackend:
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        outs, lses = [], []
        for i, seq_len in enumerate(meta.seq_lens):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            slots = meta.kv_slots[i]
            positions = torch.arange(seq_len - (end - start), seq_len, device=q.device)
            if meta.is_prefix_only and meta.is_prefix_only[i]:  # every key is visible to every query
                positions = torch.full_like(positions, seq_len - 1)
            k, v = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
            out, lse = attend(q[start:end], k, v, scale, positions)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
