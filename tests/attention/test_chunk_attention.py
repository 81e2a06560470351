"""`gpu.chunk_attention` (a long chunk: cuDNN over its prefix runs, plus its causal part) on the CPU,
with a stand-in for the cuDNN op: the folding of q heads into the query axis and back, and the
layout each call hands cuDNN. Needs Triton importable (the GPU backend's module loads its kernels):
runs on a GPU machine, or under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from .paged import attention_f64

pytestmark = pytest.mark.triton


def _cudnn(q, k, v, scale, is_causal):
    """`gpu._cudnn`'s contract (out [1, H, Lq, D], lse [1, H, Lq]), checking that q, k and v are
    stored sequence-major (BSHD) and packed, which cuDNN's ragged path requires."""
    for t in (q, k, v):
        assert t.transpose(1, 2).is_contiguous(), (t.shape, t.stride())
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if is_causal:  # top-left aligned, as cuDNN's causal flag
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse), v.double()).to(q.dtype)
    return out, lse[..., 0]


@pytest.mark.parametrize("num_new,runs", [(5, [(0, 7)]), (9, [(3, 10), (20, 41)]), (4, [])])
def test_chunk_attention_folds_heads_and_hands_cudnn_sequence_major_tensors(monkeypatch, num_new, runs):
    from mnemosyne.attention import gpu

    monkeypatch.setattr(gpu, "_cudnn", _cudnn)
    gen = torch.Generator().manual_seed(num_new)
    heads, kv_heads, d = 8, 2, 16
    k_cache = torch.randn(48, kv_heads, d, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(48, kv_heads, d, generator=gen, dtype=torch.float64)
    # q, k and v as the model hands them over: views into one fused projection's rows
    qkv = torch.randn(num_new, (heads + 2 * kv_heads) * d, generator=gen, dtype=torch.float64)
    q, k_new, v_new = (t.view(num_new, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    # The merge of the parts is a Triton kernel: on a GPU machine its tensors must live on the GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out, lse = gpu.chunk_attention(*(t.to(device) for t in (q, k_new, v_new, k_cache, v_cache)), tuple(runs),
                                   d ** -0.5)
    out, lse = out.cpu(), lse.cpu()

    prefix = [slot for start, end in runs for slot in range(start, end)]
    keys = torch.cat([k_cache[prefix], k_new]) if prefix else k_new
    values = torch.cat([v_cache[prefix], v_new]) if prefix else v_new
    q_pos = torch.arange(num_new) + len(prefix)
    ref_out, ref_lse = attention_f64(q, keys, values, d ** -0.5, q_pos, torch.arange(len(prefix) + num_new))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
