"""Fused GPU kernels against the torch ops they replace, on CUDA in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.attention.backend import merge_attention, store_kv
from mnemosyne.config import RopeScaling
from mnemosyne.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    from mnemosyne.layers.triton_ops import add_rms_norm

    x, r = (torch.randn(33, 4096, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.rand(4096, device="cuda", dtype=dtype) + 0.5
    out, res = add_rms_norm(x, w, 1e-5, r)
    h = x + r
    h32 = h.float()
    want = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(res, h, atol=0, rtol=0)
    torch.testing.assert_close(out, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    from mnemosyne.layers.triton_ops import silu_and_mul

    gate_up = torch.randn(17, 2 * 3000, device="cuda", dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, **_tol(dtype))


@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (12, 4)])  # 12: a last program of q heads half empty
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_store(dtype, heads, kv_heads):
    from mnemosyne.layers.triton_ops import rotary_store_

    rot = RotaryEmbedding(128, 500000.0, RopeScaling(rope_type="llama3", factor=8.0,
                                                     original_max_position_embeddings=8192), 131072).cuda()
    qkv = torch.randn(40, (heads + 2 * kv_heads) * 128, device="cuda", dtype=dtype)
    q, k, v = (t.view(40, -1, 128) for t in qkv.split([heads * 128, kv_heads * 128, kv_heads * 128], dim=-1))
    positions = torch.randint(0, 1 << 20, (40,), device="cuda")
    slots = torch.randperm(100, device="cuda")[:40]
    want_q, want_k = rot(positions, q.clone(), k.clone())
    kc, vc, want_kc, want_vc = (torch.zeros(100, kv_heads, 128, device="cuda", dtype=dtype) for _ in range(4))
    store_kv(want_k, v, want_kc, want_vc, slots)
    before = qkv.clone()
    rotated = rotary_store_(q, k, v, positions, rot.inv_freq, rot.attention_factor, kc, vc, slots)
    assert rotated.is_contiguous()  # packed, whatever q's row stride
    torch.testing.assert_close(rotated, want_q, **_tol(dtype))
    torch.testing.assert_close(qkv, before, atol=0, rtol=0)  # the projection's rows are left as they were
    torch.testing.assert_close(kc, want_kc, **_tol(dtype))
    torch.testing.assert_close(vc, want_vc, atol=0, rtol=0)


def test_merge_parts_and_splits():
    from mnemosyne.attention.triton_decode import merge_splits
    from mnemosyne.attention.triton_merge import merge_parts

    o = torch.randn(3, 32, 6, 128, device="cuda")
    lse = torch.randn(3, 32, 6, device="cuda")
    lse[0, 0, :3] = float("-inf")
    lse[1, 1] = float("-inf")
    o[1, 1] = 0.0
    want_o, want_lse = merge_attention(list(o.unbind(2)), list(lse.unbind(2)))
    got_o, got_lse = merge_splits(o, lse, torch.float32)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    pair_o, pair_lse = merge_parts([o[:, :, 0], o[:, :, 1]], [lse[:, :, 0], lse[:, :, 1]], torch.float32)
    want_o, want_lse = merge_attention([o[:, :, 0], o[:, :, 1]], [lse[:, :, 0], lse[:, :, 1]])
    torch.testing.assert_close(pair_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair_lse, want_lse, atol=1e-5, rtol=1e-5)
