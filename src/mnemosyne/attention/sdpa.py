"""Attention through torch's fused SDPA kernels, which also return the LSE.

A chunk of C new tokens over a prefix of P cached tokens runs as two kernels merged by LSE:
non-causal over the prefix and causal over the chunk itself. That avoids materialising a mask and
is the same split KVP uses across groups.
"""

from __future__ import annotations

import torch

from mnemosyne.attention.backend import AttentionMetadata, merge_attention


def _decode_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per head over all keys, as plain matmuls with the GQA group folded into rows.

    On CPU the fused kernel hands even this tiny work to its thread pool, which a profile of the
    default model's decode showed as most of the step on a busy 2-core machine; plain matmuls
    compute the same softmax exactly. q [1, Hq, D], k/v [Lk, Hk, D].
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    qf = q.float().view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(qf, k.float().permute(1, 2, 0)) * scale  # [Hk, G, Lk], float32 like the kernels
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse), v.float().transpose(0, 1))  # [Hk, G, D]
    return out.reshape(1, num_heads, head_dim).to(q.dtype), lse.reshape(1, num_heads)


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
        for i, seq_len in enumerate(meta.seq_lens):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            num_new = end - start
            slots = meta.kv_slots[i]
            qi = q[start:end]
            sees_all = num_new == 1 or (bool(meta.is_prefix_only) and meta.is_prefix_only[i])
            if num_new == 1 and q.device.type == "cpu":
                out, lse = _decode_with_lse(qi, *_gather(k_cache, v_cache, slots), scale)
            elif sees_all:  # a decode token, or a KVP group's earlier shard: every key, no causal part
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
