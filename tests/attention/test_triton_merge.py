"""`triton_merge.merge_parts` (every part of a long chunk merged in one pass) against a float64 LSE
merge: any part count, parts as cuDNN lays them out, rows with no keys in some or all parts."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.triton


def _reference(outs, lses):
    lse = torch.stack([x.double() for x in lses])  # [n, C, H]
    top = lse.max(0).values
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp(lse - top)
    total = w.sum(0)
    out = (torch.stack([x.double() for x in outs]) * w[..., None]).sum(0) / total.clamp_min(1e-300)[..., None]
    return out, torch.where(total > 0, top + torch.log(total), torch.full_like(total, float("-inf")))


@pytest.mark.parametrize("num_parts", [1, 2, 3, 9, 16, 17, 35])
def test_merge_parts_matches_float64(triton_device, num_parts):
    from mnemosyne.attention.triton_merge import MAX_PARTS, merge_parts

    assert MAX_PARTS == 16  # 17 and 35 parts take rounds
    gen = torch.Generator().manual_seed(num_parts)
    chunk, heads, head_dim = 7, 4, 16
    # as cuDNN returns them: out [1, H, C, D] stored sequence-major, lse [1, H, C], each seen as [C, H, ...]
    outs = [torch.randn(chunk, heads, head_dim, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)
            .to(triton_device) for _ in range(num_parts)]
    lses = [(3 * torch.randn(1, heads, chunk, generator=gen))[0].transpose(0, 1).to(triton_device)
            for _ in range(num_parts)]
    lses[0][0, 0] = float("-inf")  # a row with no keys in one part
    for lse in lses:
        lse[1, 2] = float("-inf")  # and one with none in any
    out, lse = merge_parts(outs, lses, torch.float32)
    want_out, want_lse = _reference([o.cpu() for o in outs], [x.cpu() for x in lses])
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-5, rtol=1e-5)
    assert (out[1, 2] == 0).all() and torch.isneginf(lse[1, 2])


def test_merge_parts_rounds_once_to_the_asked_dtype(triton_device):
    """Parts in half precision, summed in float32: the result is the float32 merge rounded once."""
    from mnemosyne.attention.triton_merge import merge_parts

    dtype = torch.bfloat16 if triton_device == "cuda" else torch.float16  # the interpreter has no bf16
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 4, 16, generator=gen).to(triton_device, dtype) for _ in range(12)]
    lses = [torch.randn(5, 4, generator=gen).to(triton_device) for _ in range(12)]
    out, _ = merge_parts(outs, lses, dtype)
    want, _ = merge_parts([o.float() for o in outs], lses, torch.float32)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want.to(dtype), atol=0, rtol=0)


def test_merge_parts_refuses_unpaired_lists():
    from mnemosyne.attention.triton_merge import merge_parts

    with pytest.raises(ValueError, match="as many lses as outs"):
        merge_parts([torch.zeros(1, 1, 16)], [], torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        merge_parts([], [], torch.float32)
