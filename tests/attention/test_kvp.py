"""Partial attention over KVP shards, merged over the group, equals attention over the whole sequence.

Three groups each hold one 16-token shard of the requests' KV in their own paged cache. The group of
a chunk's last shard attends causally (its own tokens included); earlier groups attend to their full
shard non-causally (`is_prefix_only`); a group where a request is not active yet sends lse = -inf.
The gather is played by a stand-in group that first records every group's part, then hands them out.
Tolerance: 1e-5 against float64 attention in float32; 2e-2 (bf16 rounding) for the GPU backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from mnemosyne.attention.backend import build_metadata, merge_attention
from mnemosyne.attention.kvp import KvpRows, gather_size, merge_over_group
from mnemosyne.attention.reference import ReferenceBackend
from mnemosyne.attention.sdpa import SdpaBackend

from .paged import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALE, attention_f64

SHARD, BLOCK, NUM_GROUPS = 16, 4, 3


@dataclass
class Seq:
    """One request: its whole K/V, and the new tokens [start, end) of this step with their queries."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    end: int
    q: torch.Tensor
    gather_start: int


class RecordingGroup:
    """all_gather over NUM_GROUPS ranks played in two passes: record each rank's part, then gather."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor | None] = [None] * NUM_GROUPS
        self.rank = 0

    def all_gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        self.parts[self.rank] = x.clone()
        if any(p is None for p in self.parts):
            return torch.stack([x] * NUM_GROUPS)
        return torch.stack(self.parts)  # type: ignore[arg-type]


def _seq(gen: torch.Generator, length: int, num_new: int, gather_start: int) -> Seq:
    return Seq(torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=gen),
               torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=gen), length - num_new, length,
               torch.randn(num_new, NUM_HEADS, HEAD_DIM, generator=gen), gather_start)


def _group_batch(group: int, seqs: list[Seq], num_gathered: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """(q, k_cache, v_cache, meta) of one group: a row per request active on it, decodes first."""
    k_cache = torch.full((32 * BLOCK, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    rows, is_prefix_only, runs, qs, local_rows, gather_rows = [], [], [], [], [], []
    next_page, next_row = 0, 0
    for seq in sorted(seqs, key=lambda s: s.end - s.start != 1):
        writer = (seq.end - 1) // SHARD
        if group > writer:
            continue  # not onboarded on this group yet
        lo = group * SHARD
        hi = seq.end if group == writer else lo + SHARD
        pages = list(range(next_page, next_page + -(-(hi - lo) // BLOCK)))
        next_page += len(pages)
        slots = torch.tensor(pages)[torch.arange(hi - lo) // BLOCK] * BLOCK + torch.arange(hi - lo) % BLOCK
        k_cache[slots], v_cache[slots] = seq.keys[lo:hi], seq.values[lo:hi]
        num_new = seq.end - seq.start
        rows.append((hi - lo, num_new, pages))
        is_prefix_only.append(group != writer)
        runs.append(((pages[0] * BLOCK, pages[0] * BLOCK + hi - lo),) if group != writer else None)
        qs.append(seq.q)
        if seq.gather_start >= 0:
            local_rows += range(next_row, next_row + num_new)
            gather_rows += range(seq.gather_start, seq.gather_start + num_new)
        next_row += num_new
    meta = build_metadata(rows, BLOCK, device)
    prefix_runs = tuple(r if r is not None and n > 1 else m
                        for r, (_, n, _), m in zip(runs, rows, meta.prefix_runs, strict=True))
    meta = replace(meta, is_prefix_only=tuple(is_prefix_only), prefix_runs=prefix_runs,
                   kvp=KvpRows(num_gathered, torch.tensor(local_rows, device=device),
                               torch.tensor(gather_rows, device=device)))
    return (torch.cat(qs).to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), meta)


def _gpu_backend():
    from mnemosyne.attention.gpu import GpuBackend

    return GpuBackend()


@pytest.mark.parametrize(("make_backend", "device", "dtype", "atol"), [
    (ReferenceBackend, "cpu", torch.float32, 1e-5),
    (SdpaBackend, "cpu", torch.float32, 1e-5),
    pytest.param(_gpu_backend, "cuda", torch.bfloat16, 2e-2, marks=pytest.mark.gpu),
], ids=["reference", "sdpa", "gpu"])
def test_shard_partials_merged_over_groups_equal_full_attention(make_backend, device, dtype, atol) -> None:
    backend = make_backend()
    gen = torch.Generator().manual_seed(0)
    seqs = [_seq(gen, 44, 5, 0),  # a 5-token chunk in the third shard: all groups active
            _seq(gen, 41, 1, 5),  # a decode in the third shard
            _seq(gen, 20, 3, 6),  # a chunk in the second shard: the third group is not onboarded
            _seq(gen, 9, 2, -1)]  # a request that lives on one group only (the first): no gather
    num_gathered = 9
    group = RecordingGroup()
    batches = [_group_batch(g, seqs, num_gathered, device, dtype) for g in range(NUM_GROUPS)]
    partials = [backend.forward(q, k, v, meta, SCALE) for q, k, v, meta in batches]
    for g in range(NUM_GROUPS):  # pass 1: record every group's part
        group.rank = g
        merge_over_group(partials[g][0].clone(), partials[g][1].clone(), batches[g][3].kvp, group.all_gather_stacked)
    for g in range(NUM_GROUPS):  # pass 2: every group merges the same parts
        group.rank = g
        out, lse = merge_over_group(*partials[g], batches[g][3].kvp, group.all_gather_stacked)
        meta, row = batches[g][3], 0
        for seq in sorted(seqs, key=lambda s: s.end - s.start != 1):
            if g > (seq.end - 1) // SHARD:
                continue
            num_new = seq.end - seq.start
            # every active group ends up with attention over the whole sequence
            want_out, want_lse = attention_f64(seq.q.to(dtype), seq.keys.to(dtype), seq.values.to(dtype),
                                               SCALE, torch.arange(seq.start, seq.end), torch.arange(seq.end))
            torch.testing.assert_close(out[row:row + num_new].double().cpu(), want_out, atol=atol, rtol=0)
            torch.testing.assert_close(lse[row:row + num_new].double().cpu(), want_lse, atol=atol, rtol=0)
            row += num_new
        assert row == meta.query_start_loc[-1]


def test_graph_form_merges_like_the_eager_form() -> None:
    """CUDA graphs gather every row of the batch (the rows of single-group requests at the spare row)
    and keep the merge where `is_multi` says: the same result, bit for bit, as naming the rows."""
    gen = torch.Generator().manual_seed(1)
    seqs = [_seq(gen, 44, 1, 0), _seq(gen, 41, 1, 1), _seq(gen, 20, 1, 2), _seq(gen, 9, 1, -1)]
    size = gather_size(3)
    assert size == 4  # three decodes and the spare row
    eager, dense = RecordingGroup(), RecordingGroup()
    for pass_ in range(2):  # pass 0 records every group's part, pass 1 merges
        for g in range(NUM_GROUPS):
            q, k, v, meta = _group_batch(g, seqs, size)
            out, lse = ReferenceBackend().forward(q, k, v, meta, SCALE)
            rows = meta.kvp
            every_row = torch.full((len(q),), size - 1)
            every_row[rows.local_rows] = rows.gather_rows
            is_multi = torch.zeros(len(q), dtype=torch.bool)
            is_multi[rows.local_rows] = True
            eager.rank = dense.rank = g
            want = merge_over_group(out.clone(), lse.clone(), rows, eager.all_gather_stacked)
            got = merge_over_group(out.clone(), lse.clone(), KvpRows(size, None, every_row, is_multi), dense.all_gather_stacked)
            if pass_ == 1:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                assert not torch.equal(want[0][rows.local_rows], out[rows.local_rows])  # a merge happened


@pytest.mark.triton
def test_gathered_parts_merge_in_one_launch_like_merge_attention(triton_device) -> None:
    """On CUDA the groups' gathered parts merge through the decode kernel's split merge, reading the
    gather in place (groups as splits, strided); it agrees with merge_attention, and a group's empty
    part (lse -inf) counts for nothing even when its out holds NaN."""
    from mnemosyne.attention.triton_decode import merge_splits

    gen = torch.Generator().manual_seed(2)
    parts = torch.randn(3, 5, 4, 17, generator=gen)  # [kvp, rows, heads, head_dim + 1]
    parts[1, 0, :, 16] = float("-inf")  # group 1 holds nothing of row 0
    parts[1, 0, :, :16] = float("nan")
    parts[:, 4, :, 16] = float("-inf")  # row 4 is empty everywhere (a spare row)
    want_out, want_lse = merge_attention(list(parts[..., :16]), list(parts[..., 16]))
    parts = parts.to(triton_device)
    out, lse = merge_splits(parts[..., :16].permute(1, 2, 0, 3), parts[..., 16].permute(1, 2, 0), torch.float32)
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-6, rtol=1e-5)
    assert not out.isnan().any() and torch.equal(out[4].cpu(), torch.zeros(4, 16))


@pytest.mark.triton
@pytest.mark.parametrize("form", ["eager", "graph"])
def test_merge_into_the_rows_in_place_like_the_cpu_merge(triton_device, form) -> None:
    """The CUDA merge of `merge_over_group`: one launch reads each row's parts through gather_rows and
    writes the merge into out/lse in place, at local_rows (eager form) or where is_multi (graph
    form), leaving every other row as it was."""
    from mnemosyne.attention.triton_decode import merge_splits_into

    gen = torch.Generator().manual_seed(3)
    parts = torch.randn(2, 6, 4, 17, generator=gen)  # [kvp, gather rows, heads, head_dim + 1]
    parts[0, 2, :, 16] = float("-inf")  # group 0 holds nothing of gather row 2
    parts[0, 2, :, :16] = float("nan")
    merged_out, merged_lse = merge_attention(list(parts[..., :16]), list(parts[..., 16]))
    out, lse = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 4, generator=gen)
    want_out, want_lse = out.clone(), lse.clone()
    if form == "eager":  # batch rows 1 and 3 are multi-group, at gather rows 2 and 0
        src, dst, keep = torch.tensor([2, 0]), torch.tensor([1, 3]), None
        want_out[dst], want_lse[dst] = merged_out[src], merged_lse[src]
    else:  # every batch row goes through the gather; single-group ones point at the spare row 5
        src, dst, keep = torch.tensor([5, 2, 5, 0, 5]), None, torch.tensor([False, True, False, True, False])
        want_out[keep], want_lse[keep] = merged_out[src[keep]], merged_lse[src[keep]]
    parts, out, lse = parts.to(triton_device), out.to(triton_device), lse.to(triton_device)
    merge_splits_into(parts[..., :16].permute(1, 2, 0, 3), parts[..., 16].permute(1, 2, 0), out, lse,
                      src.to(triton_device), None if dst is None else dst.to(triton_device),
                      None if keep is None else keep.to(triton_device))
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("form", ["eager", "graph"])
def test_pack_rows_fills_the_gather_like_index_put(triton_device, form) -> None:
    """The CUDA packing of `merge_over_group`'s gather buffer: each row's out (cast to float32) and lse
    at its gather row, in one launch, as the CPU path's index_put does."""
    from mnemosyne.attention.triton_decode import pack_rows

    gen = torch.Generator().manual_seed(4)
    out = torch.randn(5, 4, 16, generator=gen).to(torch.float16)
    lse = torch.randn(5, 4, generator=gen)
    if form == "eager":  # batch rows 1 and 3 are multi-group, at gather rows 2 and 0
        src, dst = torch.tensor([1, 3]), torch.tensor([2, 0])
    else:  # every row, in order; distinct gather rows here, so the result does not hang on write order
        src, dst = None, torch.tensor([4, 2, 5, 0, 1])
    want = torch.full((6, 4, 17), float("-inf"))
    mine = slice(None) if src is None else src
    want[dst, :, :16] = out[mine].float()
    want[dst, :, 16] = lse[mine]
    part = torch.full((6, 4, 17), float("-inf"), device=triton_device)
    pack_rows(out.to(triton_device), lse.to(triton_device), part, None if src is None else src.to(triton_device),
              dst.to(triton_device))
    assert torch.equal(part.cpu(), want)


@pytest.mark.gpu
def test_the_eager_merge_compiles_nothing_after_warm_up() -> None:
    """`KvpAttention.warm_up_merge` meets the eager merge's kernel variants, so a step with a
    multi-group prefill, whatever its row counts, does not stop to compile (call54 found it did)."""
    from mnemosyne.attention.kvp import KvpAttention
    from mnemosyne.executor.compile_watch import CompileWatch

    group = RecordingGroup()
    group.size = NUM_GROUPS
    watch = CompileWatch().install()
    KvpAttention(SdpaBackend(), group).warm_up_merge(NUM_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cuda"))
    watch.arm()
    for num_rows, num_multi in ((5, 2), (37, 17), (1024, 1000)):
        out = torch.randn(num_rows, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        lse = torch.randn(num_rows, NUM_HEADS, device="cuda")
        rows = KvpRows(gather_size(num_multi), torch.arange(num_multi, device="cuda"),
                       torch.arange(num_multi, device="cuda"))
        merge_over_group(out, lse, rows, group.all_gather_stacked)
    torch.cuda.synchronize()
    assert watch.compiles == 0
