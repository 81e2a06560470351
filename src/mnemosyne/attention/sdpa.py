"""Attention through torch's fused SDPA kernels, which also return the LSE.

A chunk of C new tokens over a prefix of P cached tokens runs as two kernels merged by LSE:
non-causal over the prefix and causal over the chunk itself. That avoids materialising a mask and
is the same split KVP uses across groups.
"""

from __future__ import annotations

import torch

from mnemosyne.attention.backend import AttentionMetadata, merge_attention


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
            if sees_all:  # a decode token, or a KVP group's earlier shard: every key, no causal part
                out, lse = _sdpa_with_lse(qi, k_cache[slots], v_cache[slots], scale, False)
            else:
                new = slots[seq_len - num_new:]
                out, lse = _sdpa_with_lse(qi, k_cache[new], v_cache[new], scale, True)
                if seq_len > num_new:
                    prefix = slots[: seq_len - num_new]
                    out_p, lse_p = _sdpa_with_lse(qi, k_cache[prefix], v_cache[prefix], scale, False)
                    out, lse = merge_attention([out_p, out], [lse_p, lse])
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
