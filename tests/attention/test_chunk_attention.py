"""`gpu.chunk_attention` (a long chunk: cuDNN over its prefix runs, plus its causal part) on the CPU,
with a stand-in for the cuDNN op: GQA handed over natively, prefix runs cut into pieces, and the layout
each call hands cuDNN. Needs
Triton importable (the GPU backend's module loads its kernels): runs on a GPU machine, or under the
Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from .paged import attention_f64

pytestmark = pytest.mark.triton


CALLS = []


def _cudnn(q, k, v, scale, is_causal):
    """`gpu._cudnn`'s contract (out [1, H, Lq, D], lse [1, H, Lq], with H q heads over H / group kv heads
    as cuDNN takes GQA), checking that q, k and v are stored sequence-major (BSHD) and packed, which
    cuDNN's ragged path requires."""
    for t in (q, k, v):
        assert t.transpose(1, 2).is_contiguous(), (t.shape, t.stride())
    CALLS.append((tuple(q.shape), tuple(k.shape), is_causal))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if is_causal:  # top-left aligned, as cuDNN's causal flag
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse), v.double()).to(q.dtype)
    return out, lse[..., 0]


@pytest.mark.parametrize("split_runs", [False, True])
@pytest.mark.parametrize("num_new,runs", [(5, [(0, 7)]), (9, [(3, 10), (20, 41)]), (4, []), (12, [(0, 44)])])
def test_chunk_attention_matches_float64_attention(monkeypatch, num_new, runs, split_runs):
    from mnemosyne.attention import gpu

    monkeypatch.setattr(gpu, "_cudnn", _cudnn)
    monkeypatch.setattr(gpu, "PIECE_MIN_KEYS", 4)
    CALLS.clear()
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
                                   d ** -0.5, split_runs=split_runs)
    out, lse = out.cpu(), lse.cpu()

    prefix = [slot for start, end in runs for slot in range(start, end)]
    keys = torch.cat([k_cache[prefix], k_new]) if prefix else k_new
    values = torch.cat([v_cache[prefix], v_new]) if prefix else v_new
    q_pos = torch.arange(num_new) + len(prefix)
    ref_out, ref_lse = attention_f64(q, keys, values, d ** -0.5, q_pos, torch.arange(len(prefix) + num_new))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)

    causal, *prefix_calls = CALLS
    assert causal == ((1, heads, num_new, d), (1, kv_heads, num_new, d), True)  # K/V never expanded
    assert all(call[0] == (1, heads, num_new, d) and not call[2] for call in prefix_calls)
    pieces = [p for run in runs for p in (gpu.run_pieces(*run) if split_runs else [run])]
    assert [call[1][2] for call in prefix_calls] == [end - start for start, end in pieces]


def test_run_pieces_are_powers_of_two_then_the_rest():
    from mnemosyne.attention.gpu import PIECE_MIN_KEYS, run_pieces

    assert PIECE_MIN_KEYS == 1024
    assert run_pieces(0, 131072) == [(0, 131072)]
    assert run_pieces(16, 16 + 7 * 16384) == [(16, 16 + 65536), (16 + 65536, 16 + 98304), (16 + 98304, 16 + 114688)]
    assert run_pieces(0, 4096 + 1023) == [(0, 4096), (4096, 5119)]  # the rest, under PIECE_MIN_KEYS, is one piece
    assert run_pieces(0, 3072) == [(0, 2048), (2048, 3072)]
    assert run_pieces(5, 100) == [(5, 100)]
    # every prefix of a prompt in 16K chunks up to 1M tokens takes its pieces from 7 lengths
    lengths = {end - start for n in range(1, 65) for start, end in run_pieces(0, n * 16384)}
    assert lengths == {16384 << i for i in range(7)}


def test_the_exact_plan_warm_up_calls_each_chunk_and_piece_length_once(monkeypatch):
    """With exact plans (no ragged path), the warm-up calls cuDNN for each chunk length a long prompt is
    cut into, over every piece length its prefixes can be cut into, so that its prefill builds none."""
    from mnemosyne.attention import gpu

    calls = []
    monkeypatch.setattr(gpu, "chunk_attention", lambda q, k, v, kc, vc, runs, scale, split_runs=False:
                        calls.append((q.shape[0], runs, split_runs)))
    k = torch.zeros(10000, 2, 16)
    gpu.GpuBackend(num_sms=8)._warm_cudnn_pieces(k, k, 8, 16, 0.25, (1024, 16384), 1 << 20)
    pieces = (1024, 2048, 4096, 8192)  # up to the cache's 10K slots
    assert calls == [(n, ((0, p),), True) for n in (1024, 16384) for p in pieces]
    calls.clear()
    gpu.GpuBackend(num_sms=8)._warm_cudnn_pieces(k, k, 8, 16, 0.25, (64,), 1 << 20)
    assert calls == []  # chunks of 64 tokens (256 rows) go to the Triton kernel


def test_many_pieces_round_to_bf16_once(monkeypatch):
    """A chunk over a prefix cut into many pieces merges many parts: the running output stays in
    float32 and is rounded to bf16 once, so its error stays that of one rounding (bf16 merged part by
    part, the error grew with the number of merges)."""
    from mnemosyne.attention import gpu

    monkeypatch.setattr(gpu, "_cudnn", _cudnn)
    monkeypatch.setattr(gpu, "PIECE_MIN_KEYS", 1)
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, d, num_new, prefix = 8, 2, 16, 6, 127  # 7 pieces and the causal part
    k_cache, v_cache = (torch.randn(prefix + num_new, kv_heads, d, generator=gen, dtype=torch.float64)
                        for _ in range(2))
    q = torch.randn(num_new, heads, d, generator=gen, dtype=torch.float64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = [t.to(device, torch.bfloat16) for t in (q, k_cache[prefix:], v_cache[prefix:], k_cache, v_cache)]
    out, _ = gpu.chunk_attention(*bf16, ((0, prefix),), d ** -0.5, split_runs=True)
    assert out.dtype == torch.bfloat16
    keys, values = bf16[3].cpu().double(), bf16[4].cpu().double()
    ref, _ = attention_f64(bf16[0].cpu().double(), keys, values, d ** -0.5, torch.arange(num_new) + prefix,
                           torch.arange(prefix + num_new))
    # one rounding of the parts (bf16 out of cuDNN's stand-in) and one of the merged result
    assert (out.cpu().double() - ref).abs().max() <= 2 * 2 ** -8 * ref.abs().max()
