"""GPU backend (Triton paged decode + cuDNN chunks) against the reference backend, in bf16."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.attention.reference import ReferenceBackend
from tests.attention.paged import HEAD_DIM, build_paged_batch

pytestmark = pytest.mark.gpu
SCALE = HEAD_DIM ** -0.5

# decodes first, as the runner orders them; scattered pages; chunks with and without a prefix
DECODES_FIRST = [
    (19, 1, [0, 12, 28, 7, 19]),
    (1, 1, [31]),
    (13, 1, [25, 10, 4, 22]),
    (22, 7, [9, 2, 30, 14, 5, 21]),
    (10, 10, [17, 3, 26]),
    (11, 3, [6, 29, 1]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backend_matches_reference(dtype):
    from mnemosyne.attention.gpu import GpuBackend

    batch = build_paged_batch(DECODES_FIRST, dtype=dtype, device="cuda")
    assert batch.meta.num_decodes == 3
    ref_out, ref_lse = ReferenceBackend().forward(batch.q.float(), batch.k_cache.float(), batch.v_cache.float(),
                                                  batch.meta, SCALE)
    out, lse = GpuBackend().forward(batch.q, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize("fold_max_keys, small_chunk_rows, decode_launches", [
    (8192, 128, 0),  # decodes and every chunk in one Triton launch
    (8192, 30, 0),  # decodes in the launch with the 7- and 3-token chunks; the 10-token one on cuDNN
    (10, 128, 1),  # a decode context (19 keys) over the cap: the decodes keep their own kernel
    (20, 128, 1),  # a chunk's context (22 keys) over the cap: the same
])
def test_decodes_ride_in_the_short_chunk_launch(monkeypatch, fold_max_keys, small_chunk_rows, decode_launches):
    """A mixed step's decodes join its short chunks' launch (one launch a layer instead of two, and no
    concatenation when every request is in it), unless a context in it is over the cap; the output
    stays in batch order and matches the reference either way."""
    from mnemosyne.attention import gpu

    monkeypatch.setattr(gpu, "FOLD_DECODE_MAX_KEYS", fold_max_keys)
    launches = []
    original = gpu.paged_decode
    monkeypatch.setattr(gpu, "paged_decode", lambda *a, **k: launches.append(1) or original(*a, **k))
    batch = build_paged_batch(DECODES_FIRST, dtype=torch.bfloat16, device="cuda")
    ref_out, ref_lse = ReferenceBackend().forward(batch.q.float(), batch.k_cache.float(), batch.v_cache.float(),
                                                  batch.meta, SCALE)
    backend = gpu.GpuBackend(small_chunk_rows=small_chunk_rows)
    out, lse = backend.forward(batch.q, batch.k_cache, batch.v_cache, batch.meta, SCALE)
    assert len(launches) == decode_launches
    short = backend._short_chunks(batch.meta, 4)
    assert (short.requests[:3] == (0, 1, 2)) == (decode_launches == 0)
    assert (small_chunk_rows >= 10 * 4) == (4 in short.requests)  # the 10-token chunk: Triton or cuDNN
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_triton_decode_splits_merge_exactly(splits):
    from mnemosyne.attention.backend import build_metadata
    from mnemosyne.attention.triton_decode import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    page, hkv, hq, d = 16, 8, 32, 128
    k = torch.randn(4096, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pages = torch.randperm(256, device="cuda", generator=gen).tolist()
    requests = [(1000, 1, pages[:63]), (17, 1, pages[63:65]), (3000, 1, pages[65:253])]
    meta = build_metadata(requests, page, "cuda")
    q = torch.randn(3, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    out, lse = paged_decode(q, k, v, meta.block_tables, meta.rows, meta.seq_lens_tensor, page, d ** -0.5, splits)
    ref_out, ref_lse = ReferenceBackend().forward(q.float(), k.float(), v.float(), meta, d ** -0.5)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_decode_tuning_runs_on_real_context():
    """The graphs' warm-up decodes empty rows, so the kernel is tuned first on a real context: a
    configuration is cached for the split class before any graph is captured."""
    from mnemosyne.attention.gpu import tune_decode
    from mnemosyne.attention.triton_decode import _tuned_decode_kernel, split_class

    page, kv_heads, heads, splits = 16, 2, 8, 40  # a split class no earlier test here meets
    kv = torch.randn(2, 64 * page, kv_heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    before = set(_tuned_decode_kernel.cache)
    tune_decode(kv[0], kv[1], heads, page, batch=3, splits=splits, scale=SCALE)
    new = set(_tuned_decode_kernel.cache) - before
    assert any(key[3] == split_class(splits) for key in new), new  # key: GROUP, HEAD_DIM, PAGE, class


def test_warm_up_tunes_every_split_class_so_no_step_tunes_mid_serving():
    """The split count is a runtime argument and the tuning key its class; the warm-up tunes every
    class, so a decode of any batch or context finds its configuration cached. When the key was the
    count itself, each new count an eager step met compiled and timed every configuration, seconds
    each, and a mixed serving run on an H200 fell minutes behind its arrivals."""
    from mnemosyne.attention.backend import build_metadata
    from mnemosyne.attention.gpu import GpuBackend
    from mnemosyne.attention.triton_decode import MAX_SPLIT_CLASS, _tuned_decode_kernel, paged_decode

    page, kv_heads, heads = 32, 2, 8  # a page size no other test here tunes
    kv = torch.randn(2, 512 * page, kv_heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    GpuBackend().warm_up(kv[0], kv[1], heads, page, SCALE)
    ours = {key for key in _tuned_decode_kernel.cache if tuple(key[:3]) == (heads // kv_heads, HEAD_DIM, page)}
    assert {key[3] for key in ours} == set(range(1, MAX_SPLIT_CLASS + 1))
    meta = build_metadata([(700, 1, list(range(22))), (90, 1, [40, 41, 42])], page, "cuda")
    q = torch.randn(2, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    for splits in (3, 5, 6, 11, 13, 100, 128):
        paged_decode(q, kv[0], kv[1], meta.block_tables, meta.rows, meta.seq_lens_tensor, page, SCALE, splits)
    assert {key for key in _tuned_decode_kernel.cache if tuple(key[:3]) == (heads // kv_heads, HEAD_DIM, page)} == ours
