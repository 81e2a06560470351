"""reference.attend and ReferenceBackend against a float64 softmax written out in the test.
Tolerance: out and lse within 1e-5 (float32 inputs, unit-normal q/k/v, head_dim 16)."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.attention.reference import ReferenceBackend, attend

from .paged import HEAD_DIM, MIXED_BATCH, NUM_HEADS, NUM_KV_HEADS, SCALE, attention_f64, build_paged_batch

ATOL = 1e-5


def _qkv(num_q: int, num_k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_q, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_k, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_k, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return q, k, v


@pytest.mark.parametrize(
    ("num_q", "num_k"),
    [
        (13, 13),  # pure prefill
        (5, 21),  # a chunk over a 16-token prefix
        (1, 17),  # decode
        (1, 1),  # the first token
    ],
)
def test_attend_matches_float64(num_q: int, num_k: int) -> None:
    q, k, v = _qkv(num_q, num_k)
    positions = torch.arange(num_k - num_q, num_k)
    out, lse = attend(q, k, v, SCALE, positions)
    want_out, want_lse = attention_f64(q, k, v, SCALE, positions, torch.arange(num_k))
    assert out.shape == (num_q, NUM_HEADS, HEAD_DIM) and out.dtype == torch.float32
    assert lse.shape == (num_q, NUM_HEADS) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=ATOL, rtol=0)


def test_attend_lse_is_natural_log_of_sum_exp() -> None:
    # One key per kv head with identical scores: lse = score + log(1), and with n equal keys log(n).
    q = torch.zeros(1, NUM_HEADS, HEAD_DIM)
    k = torch.zeros(4, NUM_KV_HEADS, HEAD_DIM)
    v = torch.arange(4.0).view(4, 1, 1).expand(4, NUM_KV_HEADS, HEAD_DIM)
    out, lse = attend(q, k, v, SCALE, torch.tensor([3]))
    torch.testing.assert_close(lse, torch.full((1, NUM_HEADS), torch.log(torch.tensor(4.0)).item()))
    torch.testing.assert_close(out, torch.full((1, NUM_HEADS, HEAD_DIM), 1.5))


def test_attend_gqa_maps_query_heads_to_consecutive_kv_heads() -> None:
    # q heads 0..3 read kv head 0 and q heads 4..7 read kv head 1 (repeat_interleave, HF layout).
    q, k, _ = _qkv(1, 3)
    v = torch.zeros(3, NUM_KV_HEADS, HEAD_DIM)
    v[:, 1] = 1.0
    out, _ = attend(q, k, v, SCALE, torch.tensor([2]))
    assert torch.all(out[:, : NUM_HEADS // 2] == 0)
    torch.testing.assert_close(out[:, NUM_HEADS // 2:], torch.ones(1, NUM_HEADS // 2, HEAD_DIM))


def test_attend_is_causal() -> None:
    # Changing a key after a query's position must not change that query's output.
    q, k, v = _qkv(6, 6)
    positions = torch.arange(6)
    out, lse = attend(q, k, v, SCALE, positions)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 3.0
    v2[4:] -= 5.0
    out2, lse2 = attend(q, k2, v2, SCALE, positions)
    torch.testing.assert_close(out2[:4], out[:4], atol=0, rtol=0)
    torch.testing.assert_close(lse2[:4], lse[:4], atol=0, rtol=0)
    assert not torch.allclose(out2[4:], out[4:])


def test_attend_keeps_bf16_out_and_float32_lse() -> None:
    q, k, v = (t.bfloat16() for t in _qkv(3, 9))
    positions = torch.arange(6, 9)
    out, lse = attend(q, k, v, SCALE, positions)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want_out, want_lse = attention_f64(q, k, v, SCALE, positions, torch.arange(9))
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)  # one bf16 rounding of out
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)  # computed in float32


def test_reference_backend_on_paged_mixed_batch_matches_float64() -> None:
    batch = build_paged_batch(MIXED_BATCH)
    out, lse = ReferenceBackend().forward(batch.q, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    num_tokens = batch.q.shape[0]
    assert out.shape == (num_tokens, NUM_HEADS, HEAD_DIM) and lse.shape == (num_tokens, NUM_HEADS)
    for i, seq_len in enumerate(batch.meta.seq_lens):
        start, end = batch.meta.query_start_loc[i], batch.meta.query_start_loc[i + 1]
        positions = torch.arange(seq_len - batch.num_new[i], seq_len)
        want_out, want_lse = attention_f64(batch.q[start:end], batch.keys[i], batch.values[i], SCALE,
                                           positions, torch.arange(seq_len))
        torch.testing.assert_close(out[start:end].double(), want_out, atol=ATOL, rtol=0, msg=f"request {i}")
        torch.testing.assert_close(lse[start:end].double(), want_lse, atol=ATOL, rtol=0, msg=f"request {i}")


def test_reference_backend_does_not_mutate_cache() -> None:
    batch = build_paged_batch(MIXED_BATCH)
    k_before, v_before = batch.k_cache.clone(), batch.v_cache.clone()
    ReferenceBackend().forward(batch.q, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    assert torch.equal(batch.k_cache.nan_to_num(), k_before.nan_to_num())
    assert torch.equal(batch.v_cache.nan_to_num(), v_before.nan_to_num())
