"""The paged decode kernel's split spans against the reference, on a GPU or under the Triton
interpreter (float16 there: the interpreter has no bfloat16 tl.dot)."""

from __future__ import annotations

import os

import pytest
import torch

from mnemosyne.attention.backend import build_metadata
from mnemosyne.attention.reference import ReferenceBackend

pytestmark = pytest.mark.triton
DTYPE = torch.float16 if os.environ.get("TRITON_INTERPRET") == "1" else torch.bfloat16


@pytest.mark.parametrize("splits,min_span", [(1, 0), (4, 0), (4, 256), (8, 512), (3, 128), (256, 0)])
def test_rows_of_scattered_lengths_split_by_span_match_the_reference(triton_device, splits, min_span):
    """One long row among short ones (and a padding row): with min_span, a short row uses fewer of
    the grid's splits than the long one; every split count and span gives the reference's answer, and
    the padding row gets out 0 and lse -inf."""
    from mnemosyne.attention.triton_decode import paged_decode

    page, kv_heads, heads, d = 16, 2, 8, 64
    gen = torch.Generator().manual_seed(splits + min_span)
    k = torch.randn(128 * page, kv_heads, d, generator=gen).to(DTYPE)
    v = torch.randn(128 * page, kv_heads, d, generator=gen).to(DTYPE)
    pages = torch.randperm(128, generator=gen).tolist()
    requests = [(1500, 1, pages[:94]), (40, 1, pages[94:97]), (300, 1, pages[97:116]), (0, 1, [])]
    meta = build_metadata(requests, page, "cpu")
    q = torch.randn(len(requests), heads, d, generator=gen).to(DTYPE)
    device = triton_device
    out, lse = paged_decode(q.to(device), k.to(device), v.to(device), meta.block_tables.to(device),
                            meta.rows.to(device), meta.seq_lens_tensor.to(device), page, d ** -0.5, splits, min_span)
    live = build_metadata(requests[:3], page, "cpu")
    ref_out, ref_lse = ReferenceBackend().forward(q[:3].float(), k.float(), v.float(), live, d ** -0.5)
    torch.testing.assert_close(out[:3].float().cpu(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:3].cpu(), ref_lse, atol=1e-3, rtol=1e-4)
    assert torch.equal(out[3].float().cpu(), torch.zeros(heads, d)) and torch.isinf(lse[3]).all()


def test_split_policies_give_the_choices_timed_on_the_h200():
    from mnemosyne.attention.triton_decode import (
        GRAPH_PROGRAMS,
        MAX_SPLITS,
        decode_min_span,
        decode_splits,
        graph_decode_splits,
    )

    # benchmarks/gpu_kernels.py --only scattered and --only splits: at least the splits that fill the
    # SMs, and the longest row's spans no longer than a program's share of the work, nor than 2K
    assert decode_splits(64, 8, 65536, 132, total=65536 + 63 * 1024) == 32  # a 64K row among 63 of 1K
    assert decode_splits(64, 8, 4096, 132) == 2
    assert decode_splits(1, 8, 131072, 132) == 66
    for context in (262144, 524288, 1 << 20):  # one long row: 66, not one split per 2K tokens
        assert decode_splits(1, 8, context, 132) == 66
    assert decode_min_span(64, 8, 132) == 1024 and decode_min_span(1, 8, 132) == 128  # a lone row: spread
    for batch in (1, 2, 8, 32, 64, 128, 256):
        splits = graph_decode_splits(batch, 8, 131072, 132)
        assert 1 <= splits <= 128 and (batch * 8 * splits <= GRAPH_PROGRAMS or splits <= 2)
    # one row over 2 kv heads (tp=4): 256 splits, not 128, for about four programs an SM
    assert decode_splits(1, 2, 1 << 20, 132) == graph_decode_splits(1, 2, 1 << 20, 132) == MAX_SPLITS == 256
    assert graph_decode_splits(1, 8, 4096, 132) == 32  # no more splits than 128-token spans of the longest context


def test_graph_split_variants_replay_the_fewest_splits_a_step_needs():
    from mnemosyne.attention.triton_decode import (
        MAX_SPLIT_TOKENS,
        decode_splits,
        graph_decode_splits,
        graph_split_variants,
        graph_variant,
    )

    assert graph_split_variants(64, 8, 131072, 132) == (2, 4, 8, 16, 32)
    assert graph_split_variants(8, 8, 131072, 132) == (9, 16, 32, 64, 128)
    assert graph_split_variants(1, 8, 1 << 20, 132) == (66, 128)
    assert graph_split_variants(1, 2, 1 << 20, 132) == (256,)  # tp=4: the batch alone needs the most
    # 64 x 4K and one 128K-1M row replay the eager step's splits, timed best on the H200
    assert graph_variant((2, 4, 8, 16, 32), decode_splits(64, 8, 4096, 132), 4096) == 2
    assert graph_variant((66, 128), decode_splits(1, 8, 1 << 20, 132), 1 << 20) == 66
    assert graph_variant((9, 16, 32, 64, 128), 10, 32768) == 16  # 8 x 32K with a few short rows
    assert graph_variant((66, 128), 66, 128 * MAX_SPLIT_TOKENS + 1) is None  # eager: splits follow the context
    for batch in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        for max_seq_len in (4096, 131072, 1 << 20):
            variants = graph_split_variants(batch, 8, max_seq_len, 132)
            assert variants[-1] == graph_decode_splits(batch, 8, max_seq_len, 132)
            assert list(variants) == sorted(set(variants))
            for longest in range(1, max_seq_len + 1, max_seq_len // 97):
                eager = decode_splits(batch, 8, longest, 132)
                chosen = graph_variant(variants, eager, longest)
                if longest > variants[-1] * MAX_SPLIT_TOKENS:
                    assert chosen is None  # eager
                else:  # the fewest captured splits that are at least the eager step's, else the most there are
                    assert chosen == next((s for s in variants if s >= eager), variants[-1])
