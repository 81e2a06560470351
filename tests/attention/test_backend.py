"""The backend seam: the exact LSE merge over disjoint key sets, the KV write and backend selection.
Merge tolerance: 1e-5 on out and lse against unpartitioned attention (float32)."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.attention.backend import (
    build_metadata,
    merge_attention,
    select_backend,
    store_kv,
)
from mnemosyne.attention.reference import ReferenceBackend, attend
from mnemosyne.attention.sdpa import SdpaBackend

from .paged import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALE, attention_f64

ATOL = 1e-5
SEQ_LEN = 24


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ_LEN, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(SEQ_LEN, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(SEQ_LEN, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return q, k, v


def _partitions(kind: str) -> list[torch.Tensor]:
    """Disjoint key index sets covering 0..SEQ_LEN-1."""
    keys = torch.arange(SEQ_LEN)
    if kind == "contiguous-2":
        return [keys[:10], keys[10:]]
    if kind == "contiguous-3":
        return [keys[:5], keys[5:17], keys[17:]]
    if kind == "interleaved-2":
        return [keys[0::2], keys[1::2]]
    if kind == "interleaved-3":
        return [keys[0::3], keys[1::3], keys[2::3]]
    if kind == "permuted-3":
        perm = torch.randperm(SEQ_LEN, generator=torch.Generator().manual_seed(1))
        return [perm[:4].sort().values, perm[4:15].sort().values, perm[15:].sort().values]
    raise ValueError(kind)


KINDS = ["contiguous-2", "contiguous-3", "interleaved-2", "interleaved-3", "permuted-3"]


@pytest.mark.parametrize("kind", KINDS)
def test_merge_of_non_causal_parts_equals_full_attention(kind: str, qkv) -> None:
    q, k, v = qkv
    sees_all = torch.full((SEQ_LEN,), SEQ_LEN - 1)  # every query sees every key
    full_out, full_lse = attend(q, k, v, SCALE, sees_all)
    outs, lses = [], []
    for part in _partitions(kind):
        out, lse = attend(q, k[part], v[part], SCALE, sees_all)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, full_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=ATOL, rtol=0)
    want_out, want_lse = attention_f64(q, k, v, SCALE, sees_all, torch.arange(SEQ_LEN))
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_of_causal_parts_with_empty_rows(kind: str, qkv) -> None:
    # Queries at every position over causally masked parts: a part whose keys all lie after a
    # query's position is empty for that row (lse = -inf, out 0, as fused kernels return it).
    q, k, v = qkv
    positions = torch.arange(SEQ_LEN)
    outs, lses = [], []
    for part in _partitions(kind):
        out, lse = attention_f64(q, k[part], v[part], SCALE, positions, part)
        outs.append(out.float())
        lses.append(lse.float())
    assert any(torch.isinf(lse).any() for lse in lses), "the test needs at least one empty row"
    out, lse = merge_attention(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want_out, want_lse = attention_f64(q, k, v, SCALE, positions, positions)
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=ATOL, rtol=0)


def test_merge_ignores_whatever_an_empty_part_outputs(qkv) -> None:
    # reference.attend leaves NaN in `out` for rows that see no key (0/0 softmax) while its lse is
    # -inf; the merge contract is that such a part contributes nothing.
    q, k, v = qkv
    prefix = 10
    positions = torch.arange(SEQ_LEN)
    out_p, lse_p = attend(q, k[:prefix], v[:prefix], SCALE, positions)
    out_s, lse_s = attend(q, k[prefix:], v[prefix:], SCALE, positions - prefix)
    assert torch.isinf(lse_s[:prefix]).all()
    out, lse = merge_attention([out_p, out_s], [lse_p, lse_s])
    assert not torch.isnan(out).any()
    full_out, full_lse = attend(q, k, v, SCALE, positions)
    torch.testing.assert_close(out, full_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=ATOL, rtol=0)


def test_merge_row_empty_in_every_part_is_zero_not_nan() -> None:
    outs = [torch.zeros(3, 2, 4), torch.ones(3, 2, 4)]
    lses = [torch.full((3, 2), float("-inf")), torch.tensor([[0.5, 1.0], [float("-inf")] * 2, [2.0, -1.0]])]
    lses[0][2] = torch.tensor([2.0, -1.0])
    out, lse = merge_attention(outs, lses)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros(2, 4)) and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    torch.testing.assert_close(out[0], torch.ones(2, 4))  # only part 1 has keys
    torch.testing.assert_close(out[2], torch.full((2, 4), 0.5))  # equal mass in both parts
    torch.testing.assert_close(lse[2], torch.tensor([2.0, -1.0]) + torch.log(torch.tensor(2.0)))


def test_merge_is_stable_for_large_lse_and_order_free() -> None:
    gen = torch.Generator().manual_seed(3)
    outs = [torch.randn(5, 4, 8, generator=gen) for _ in range(3)]
    # Multiples of 1/64, so adding 1000 below is exact in float32.
    lses = [(torch.randn(5, 4, generator=gen) * 3 * 64).round() / 64 for _ in range(3)]
    out, lse = merge_attention(outs, lses)
    shifted_out, shifted_lse = merge_attention(outs, [x + 1000.0 for x in lses])  # exp(1000) overflows
    # The merged lse near 1000 is rounded to float32's ulp there (6.1e-5), which every weight inherits.
    assert torch.isfinite(shifted_out).all()
    torch.testing.assert_close(shifted_out, out, atol=3e-4, rtol=0)
    torch.testing.assert_close(shifted_lse, lse + 1000.0, atol=3e-4, rtol=0)
    rev_out, rev_lse = merge_attention(outs[::-1], lses[::-1])
    torch.testing.assert_close(rev_out, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(rev_lse, lse, atol=1e-6, rtol=0)
    one_out, one_lse = merge_attention(outs[:1], lses[:1])
    torch.testing.assert_close(one_out, outs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(one_lse, lses[0])


def test_merge_keeps_out_dtype_and_returns_float32_lse(qkv) -> None:
    q, k, v = (t.bfloat16() for t in qkv)
    sees_all = torch.full((SEQ_LEN,), SEQ_LEN - 1)
    parts = _partitions("interleaved-2")
    results = [attend(q, k[p], v[p], SCALE, sees_all) for p in parts]
    out, lse = merge_attention([r[0] for r in results], [r[1] for r in results])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want_out, want_lse = attention_f64(q, k, v, SCALE, sees_all, torch.arange(SEQ_LEN))
    torch.testing.assert_close(out.double(), want_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_only_the_mapped_slots(cache_dtype: torch.dtype) -> None:
    num_slots = 32
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    k_cache = torch.full((num_slots, NUM_KV_HEADS, HEAD_DIM), -7.0, dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, -9.0)
    slot_mapping = torch.tensor([17, 3, 30, 4, 11])
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    assert k_cache.dtype == cache_dtype
    for token, slot in enumerate(slot_mapping.tolist()):
        assert torch.equal(k_cache[slot], k[token].to(cache_dtype))
        assert torch.equal(v_cache[slot], v[token].to(cache_dtype))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert (k_cache[untouched] == -7.0).all() and (v_cache[untouched] == -9.0).all()


def test_store_kv_overwrites_a_slot() -> None:
    k_cache = torch.zeros(8, 1, 2)
    v_cache = torch.zeros(8, 1, 2)
    store_kv(torch.ones(1, 1, 2), torch.ones(1, 1, 2), k_cache, v_cache, torch.tensor([5]))
    store_kv(torch.full((1, 1, 2), 2.0), torch.full((1, 1, 2), 3.0), k_cache, v_cache, torch.tensor([5]))
    assert torch.equal(k_cache[5], torch.full((1, 2), 2.0)) and torch.equal(v_cache[5], torch.full((1, 2), 3.0))
    assert k_cache.sum() == 4.0 and v_cache.sum() == 6.0


def test_metadata_counts_requests() -> None:
    meta = build_metadata([(6, 1, [3, 1]), (10, 3, [0, 1, 2])], page_size=4)
    assert meta.num_requests == 2 and meta.num_decodes == 1
    assert meta.slot_mapping.tolist() == [5, 7, 8, 9]
    assert meta.kv_slots[0].tolist() == [12, 13, 14, 15, 4, 5]
    assert meta.prefix_runs == ((), ((0, 7),))


def test_select_backend_by_name() -> None:
    cpu = torch.device("cpu")
    assert isinstance(select_backend("reference", cpu), ReferenceBackend)
    assert isinstance(select_backend("sdpa", cpu), SdpaBackend)
    assert isinstance(select_backend("auto", cpu), SdpaBackend)
