"""The short-chunk Triton kernel, and the GPU backend that routes short chunks to it, against the
reference backend in float32. Runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (float16 only:
the interpreter multiplies bfloat16 bit patterns in tl.dot). Tolerances: out 2e-2 (one rounding of
the probabilities to q's dtype), lse 1e-3."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mnemosyne.attention.backend import build_metadata
from mnemosyne.attention.reference import ReferenceBackend

from .paged import SCALE, build_paged_batch

pytestmark = pytest.mark.triton
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="Triton's interpreter has no bfloat16 tl.dot (triton#11584)"))]
PAGE, NUM_KV_HEADS, HEAD_DIM = 16, 2, 64


def _batch(num_news: list[int], prefixes: list[int], prefix_only: list[bool], group: int, dtype: torch.dtype,
           device: str):
    """Chunks over scattered pages of one cache; NaN in every slot no chunk owns."""
    gen = torch.Generator().manual_seed(sum(num_news) + group)
    num_pages = sum(-(-(p + c) // PAGE) for c, p in zip(num_news, prefixes, strict=True)) + 8
    pages = torch.randperm(num_pages, generator=gen).tolist()
    requests = []
    for num_new, prefix in zip(num_news, prefixes, strict=True):
        used = -(-(prefix + num_new) // PAGE)
        requests.append((prefix + num_new, num_new, pages[:used]))
        pages = pages[used:]
    meta = dataclasses.replace(build_metadata(requests, PAGE, device), is_prefix_only=tuple(prefix_only))
    k = torch.full((num_pages * PAGE, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    v = torch.full_like(k, float("nan"))
    for slots in meta.kv_slots:
        k[slots.cpu()] = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
        v[slots.cpu()] = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(sum(num_news), group * NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), meta


def _check(out, lse, q, k, v, meta, rows=slice(None)):
    ref_out, ref_lse = ReferenceBackend().forward(q.float(), k.float(), v.float(), meta, HEAD_DIM ** -0.5)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out[rows], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse[rows], atol=1e-3, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("num_new", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_match_reference(dtype, group, num_new, num_splits, triton_device):
    """Prefixes of 0 tokens, part of a page and several pages; one row a KVP group's earlier shard,
    whose queries see every key; all in one launch."""
    from mnemosyne.attention.triton_chunk import paged_chunks, short_chunks

    q, k, v, meta = _batch([num_new] * 4, [0, 11, 150, 45], [False, False, False, True], group, dtype,
                           triton_device)
    chunks = short_chunks(meta, range(4))
    out, lse = paged_chunks(q, k, v, meta.block_tables, chunks, PAGE, HEAD_DIM ** -0.5, num_splits)
    _check(out, lse, q, k, v, meta)


def test_chunks_of_different_lengths_share_a_launch(triton_device):
    """Some chunks of the metadata only, of different lengths, and splits chosen for a long one:
    shorter contexts leave their last splits empty."""
    from mnemosyne.attention.triton_chunk import chunk_splits, paged_chunks, short_chunks

    q, k, v, meta = _batch([3, 64, 1, 33, 7], [2000, 5, 70, 0, 16], [False] * 5, 4, torch.float16, triton_device)
    chunks = short_chunks(meta, [0, 2, 3, 4])
    splits = chunk_splits(chunks, q.shape[1], NUM_KV_HEADS, num_sms=8)
    assert splits > 1
    out, lse = paged_chunks(q, k, v, meta.block_tables, chunks, PAGE, HEAD_DIM ** -0.5, splits)
    _check(out, lse, q, k, v, meta, torch.cat([torch.arange(0, 3), torch.arange(67, 68 + 33 + 7)]))


def test_queries_without_keys_get_zero_and_minus_inf(triton_device):
    """A KVP group's earlier shard with no keys yet: out 0, lse -inf, whatever the splits."""
    from mnemosyne.attention.triton_chunk import ShortChunks, paged_chunks

    q, k, v, meta = _batch([5], [20], [False], 4, torch.float16, triton_device)
    # block-table row, keys, first query position, first q row, queries, first output row
    table = torch.tensor([[0, 0, -1, 0, 5, 0]], dtype=torch.int32, device=triton_device)
    for splits in (1, 3):
        out, lse = paged_chunks(q, k, v, meta.block_tables, ShortChunks((0,), table, 5, 5, 0), PAGE,
                                HEAD_DIM ** -0.5, splits)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


# Decodes first, as the runner orders them; scattered pages (block size 4); group 4.
PREFIX_ONLY = (30, 6, [6, 29, 1, 40, 44, 33, 35, 38])
"""Short, a KVP group's earlier shard: every query sees all 30 keys."""
ROUTED = [
    (19, 1, [0, 12, 28, 7, 19]),
    (1, 1, [31]),
    (22, 7, [9, 2, 30, 14, 5, 21]),  # short, over a prefix starting mid-block
    (10, 10, [17, 3, 26]),  # short, no prefix
    PREFIX_ONLY,
    (11, 3, [41, 42, 43]),  # short, first new token starts a block
]
LONG = (200, 140, list(range(45, 95)))
"""4 × 140 query rows per kv head, over SMALL_CHUNK_ROWS: cuDNN, so only on a GPU, amid short chunks."""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("long_to_triton", [False, True])
def test_backend_routes_mixed_batch(dtype, long_to_triton, triton_device):
    """The long chunk goes to cuDNN (so only on a GPU) at the default split, and joins the short ones
    in the Triton launch when the split is raised (as under a TBT SLO)."""
    from mnemosyne.attention.gpu import SMALL_CHUNK_ROWS, GpuBackend

    with_long = long_to_triton or triton_device == "cuda"
    requests = ROUTED[:4] + ([LONG] if with_long else []) + ROUTED[4:]
    assert 4 * LONG[1] > SMALL_CHUNK_ROWS >= 4 * max(n for _, n, _ in ROUTED)
    batch = build_paged_batch(requests, num_blocks=96, dtype=dtype, device=triton_device)
    meta = dataclasses.replace(batch.meta, is_prefix_only=tuple(r is PREFIX_ONLY for r in requests))
    ref_out, ref_lse = ReferenceBackend().forward(batch.q.float(), batch.k_cache.float(), batch.v_cache.float(),
                                                  meta, SCALE)
    backend = GpuBackend(num_sms=8, small_chunk_rows=4 * LONG[1] if long_to_triton else SMALL_CHUNK_ROWS)
    for _ in range(2):  # the second layer reuses the step's chunk table
        out, lse = backend.forward(batch.q, batch.k_cache, batch.v_cache, meta, SCALE)
        assert out.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)
    num_to_cudnn = with_long and not long_to_triton
    # the decodes ride in the launch too (their contexts are short)
    assert len(backend._short_chunks(meta, 4).requests) == meta.num_requests - num_to_cudnn


def test_warm_up_runs_every_tile_height_before_serving(triton_device, monkeypatch):
    """GpuBackend.warm_up runs the chunk kernel once per tile height (16 to 128 rows) over a real
    context, so that no short chunk mid-serving is the one whose configurations get compiled and timed."""
    from mnemosyne.attention import gpu, triton_chunk

    group, heights = 4, []
    k = torch.randn(64 * PAGE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float16, device=triton_device)

    def recording(q, *args, **kwargs):
        heights.append(triton_chunk._row_tiles(group, q.shape[0])[0])
        return triton_chunk.paged_chunks(q, *args, **kwargs)

    cudnn_calls = []
    monkeypatch.setattr(gpu, "paged_chunks", recording)
    monkeypatch.setattr(gpu, "chunk_attention", lambda *args: cudnn_calls.append(args))
    gpu.GpuBackend(num_sms=8).warm_up(k, torch.randn_like(k), NUM_KV_HEADS * group, PAGE, SCALE, context=32 * PAGE)
    assert heights == [16, 32, 64, 128]
    assert len(cudnn_calls) == (k.device.type == "cuda")  # and cuDNN's set-up, on a GPU


def test_a_raised_split_keeps_long_chunks_over_long_prefixes_on_cudnn():
    """Under a TBT SLO's split (8192 rows), short prompts' chunks join the Triton launch, but a chunk of
    256 tokens or more over a long enough prefix (attention/routing.py) stays on cuDNN."""
    from mnemosyne.attention.gpu import SMALL_CHUNK_ROWS, GpuBackend

    serving = GpuBackend(num_sms=8, small_chunk_rows=8192)
    assert serving._routes_to_triton(2048, 4, 0) and serving._routes_to_triton(1024, 4, 4096)  # a prompt's early chunks
    assert not serving._routes_to_triton(2048, 4, 131072) and not serving._routes_to_triton(256, 4, 24576)
    assert serving._routes_to_triton(255, 4, 131072) and serving._routes_to_triton(64, 4, 131072)  # LARS's small chunks
    assert not serving._routes_to_triton(2049, 4, 0)  # over the split
    lone = GpuBackend(num_sms=8)
    assert SMALL_CHUNK_ROWS == 512 and lone._routes_to_triton(128, 4, 0) and not lone._routes_to_triton(129, 4, 0)
