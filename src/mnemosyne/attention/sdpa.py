"""Attention through torch's fused SDPA kernels, which also return the LSE.

A chunk of C new tokens over a prefix of P cached tokens runs as two kernels merged by LSE:
non-causal over the prefix and causal over the chunk itself. That avoids materialising a mask and
is the same split KVP uses across groups.
"""

from __future__ import annotations

import torch

from mnemosyne.attention.backend import AttentionMetadata, merge_attention


def _batched_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: tuple[torch.Tensor, ...], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All single-token queries of a step at once, keys padded to the longest context and masked.

    One set of ops per layer instead of one per request: on CPU the per-request calls dominated a
    batched decode step (and the fused kernel hands even one row's work to its thread pool).
    q [B, Hq, D]; slots[b] [L_b] -> out [B, Hq, D] in q's dtype, lse [B, Hq] float32.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    lengths = torch.tensor([s.numel() for s in slots])
    index = torch.nn.utils.rnn.pad_sequence(list(slots), batch_first=True)  # [B, L], padded with slot 0
    longest = index.shape[1]
    k = k_cache.index_select(0, index.flatten()).view(batch, longest, num_kv_heads, head_dim).float()
    v = v_cache.index_select(0, index.flatten()).view(batch, longest, num_kv_heads, head_dim).float()
    qf = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
    padded = torch.arange(longest).unsqueeze(0) >= lengths.unsqueeze(1)  # [B, L]
    scores.masked_fill_(padded[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bhgl,blhd->bhgd", torch.exp(scores - lse), v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype), lse.reshape(batch, num_heads)


def _sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hk, D] -> out [Lq, Hq, D], lse [Lq, Hq] float32."""
    group = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, is_causal, scale=scale)
    else:
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, is_causal, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # index_select, not k_cache[slots]: advanced indexing is ~20x slower on CPU for these shapes
    return k_cache.index_select(0, slots), v_cache.index_select(0, slots)


class SdpaBackend:
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        outs, lses = [], []
        num_batched = meta.num_decodes if q.device.type == "cpu" else 0
        if num_batched:
            out, lse = _batched_decode(q[:num_batched], k_cache, v_cache, meta.kv_slots[:num_batched], scale)
            outs.append(out)
            lses.append(lse)
        for i in range(num_batched, meta.num_requests):
            seq_len = meta.seq_lens[i]
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            num_new = end - start
            slots = meta.kv_slots[i]
            qi = q[start:end]
            sees_all = num_new == 1 or (bool(meta.is_prefix_only) and meta.is_prefix_only[i])
            if sees_all:  # a decode token, or a KVP group's earlier shard: every key, no causal part
                out, lse = _sdpa_with_lse(qi, *_gather(k_cache, v_cache, slots), scale, False)
            else:
                new = slots[seq_len - num_new:]
                out, lse = _sdpa_with_lse(qi, *_gather(k_cache, v_cache, new), scale, True)
                if seq_len > num_new:
                    prefix = slots[: seq_len - num_new]
                    out_p, lse_p = _sdpa_with_lse(qi, *_gather(k_cache, v_cache, prefix), scale, False)
                    out, lse = merge_attention([out_p, out], [lse_p, lse])
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
