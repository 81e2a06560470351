"""The gate/up GEMM with SiLU × up fused (`layers/triton_swiglu.py`) against float32 and against the
unfused path (cuBLAS, then the SiLU × up kernel), the MLP's dispatch to it, and the interleaved weight
layout it reads, on the CPU too. The kernel needs TMA (compute capability 9.0+): those tests are marked
`gpu` and skip on older GPUs.

Tolerance: the fused path rounds as the unfused one does (gate and up to bf16, SiLU to bf16, then the
product), so against float32 it is off by the same few units in the last place; against the unfused
path it may differ only where the two GEMMs' float32 sums, added in different orders, round to
neighbouring bf16 values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.config import ModelConfig
from mnemosyne.distributed.comm import SINGLE, Group
from mnemosyne.models import llama

BF16_ULP = 2.0 ** -7


def _needs_tma() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused kernel needs TMA (compute capability 9.0 or later)")


def _interleave(w: torch.Tensor, block: int) -> torch.Tensor:
    """[gate; up] -> gate and up rows alternating in blocks of `block`."""
    inter = w.shape[0] // 2
    return w.view(2, inter // block, block, -1).transpose(0, 1).reshape(2 * inter, -1).contiguous()


def _operands(rows: int, hidden: int, inter: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(2 * inter, hidden, generator=gen) / hidden ** 0.5
    return x.cuda().bfloat16(), w.cuda().bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden,inter", [(1, 256, 256), (100, 256, 512), (1000, 512, 1024), (4096, 4096, 14336)],
                         ids=lambda v: str(v))
def test_fused_matches_float32_and_the_unfused_path(rows, hidden, inter):
    """Row counts that are not multiples of a tile: TMA's bounds do the masking."""
    _needs_tma()
    from mnemosyne.layers.triton_ops import silu_and_mul
    from mnemosyne.layers.triton_swiglu import BLOCK_N, gate_up_silu

    x, w = _operands(rows, hidden, inter)
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    want = F.silu(gate) * up
    unfused = silu_and_mul(F.linear(x, w))
    out = gate_up_silu(x, _interleave(w, BLOCK_N))
    assert out.shape == (rows, inter) and out.dtype == torch.bfloat16 and out.is_contiguous()
    # the unfused path's own error against float32 bounds the fused one's
    bound = (unfused.float() - want).abs().max().item()
    assert (out.float() - want).abs().max().item() <= 1.5 * bound + 1e-6
    torch.testing.assert_close(out.float(), unfused.float(), rtol=4 * BF16_ULP, atol=1e-3)
    # the separate kernel reads the interleaved layout too (short inputs, with --fused-swiglu)
    assert torch.equal(silu_and_mul(F.linear(x, _interleave(w, BLOCK_N)), BLOCK_N), unfused)


@pytest.mark.gpu
def test_what_the_kernel_cannot_take():
    _needs_tma()
    from mnemosyne.layers.triton_swiglu import gate_up_silu, supported

    x, w = _operands(0, 256, 256)
    assert gate_up_silu(x, w).shape == (0, 256)
    assert supported(x, w)
    assert not supported(x, w[:2 * 200])  # not in whole tiles of features
    assert not supported(x.float(), w.float()) and not supported(x.cpu(), w.cpu())
    assert not supported(torch.zeros(4, 512, device="cuda", dtype=torch.bfloat16)[:, ::2], w)


def test_the_layout_block_is_the_kernels_tile():
    pytest.importorskip("triton")
    from mnemosyne.layers.triton_swiglu import BLOCK_N

    assert llama.FUSED_SWIGLU_BLOCK == BLOCK_N


def _mlp_pair(monkeypatch, block: int, tp: Group = SINGLE, hidden: int = 64, inter: int = 128):
    """The same HF weights loaded into an MLP with --fused-swiglu (its gate/up interleaved in blocks of
    `block`) and one without."""
    monkeypatch.setattr(llama, "FUSED_SWIGLU_BLOCK", block)
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    gen = torch.Generator().manual_seed(1)
    weights = {"gate": torch.randn(inter, hidden, generator=gen) / hidden ** 0.5,
               "up": torch.randn(inter, hidden, generator=gen) / hidden ** 0.5,
               "down": torch.randn(hidden, inter, generator=gen) / inter ** 0.5}
    pair = []
    for fused in (True, False):
        mlp = llama.LlamaMLP(cfg, tp, fused_swiglu=fused)
        w = mlp.gate_up_proj.weight
        w.weight_loader(w, weights["up"], 1)
        w.weight_loader(w, weights["gate"], 0)
        mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, weights["down"])
        pair.append(mlp)
    return pair


@pytest.mark.parametrize("tp", [SINGLE, Group(rank=1, size=2)], ids=["tp1", "tp2-rank1"])
def test_cpu_mlp_is_the_same_with_the_interleaved_layout(monkeypatch, tp):
    """The activations (down_proj aside: at tp=2 it would all-reduce) of the rank's features, in their
    natural order either way. Equal to float32 rounding: the CPU GEMM's blocking may differ by column."""
    on, off = _mlp_pair(monkeypatch, 16, tp)
    assert on.interleave == 16 and off.interleave is None
    assert not torch.equal(on.gate_up_proj.weight, off.gate_up_proj.weight)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    on.down_proj = off.down_proj = torch.nn.Identity()
    torch.testing.assert_close(on(x), off(x), rtol=1e-6, atol=1e-6)


def test_a_shard_not_in_whole_blocks_keeps_the_plain_layout(monkeypatch):
    on, _ = _mlp_pair(monkeypatch, 48)  # built with fused_swiglu, but 128 features: not a multiple of 48
    assert on.interleave is None


@pytest.mark.gpu
def test_the_mlp_takes_the_fused_kernel_for_long_inputs_only(monkeypatch):
    """Below FUSED_SWIGLU_MIN_ROWS, cuBLAS and the separate kernel on the interleaved weight; in a CUDA
    graph too; against the MLP without the flag."""
    _needs_tma()
    from mnemosyne.layers import triton_swiglu

    calls = []
    fused_fn = triton_swiglu.gate_up_silu
    monkeypatch.setattr(triton_swiglu, "gate_up_silu", lambda x, w: calls.append(x.shape[0]) or fused_fn(x, w))
    on, off = (m.cuda().bfloat16() for m in _mlp_pair(monkeypatch, triton_swiglu.BLOCK_N, hidden=256, inter=512))
    long_rows = triton_swiglu.FUSED_SWIGLU_MIN_ROWS
    x = torch.randn(long_rows, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(on(x), off(x), rtol=4 * BF16_ULP, atol=1e-3)
    assert calls == [long_rows]
    assert torch.equal(on(x[:long_rows - 1]), off(x[:long_rows - 1])) and calls == [long_rows]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = on(x)
    x.normal_()
    graph.replay()
    torch.testing.assert_close(out, off(x), rtol=4 * BF16_ULP, atol=1e-3)


def test_the_engine_generates_the_same_with_and_without(monkeypatch):
    """dummy:tiny (intermediate 128) in blocks of 32, on the CPU: the same tokens, logprobs to float32 rounding."""
    from mnemosyne.engine.llm import LLM
    from mnemosyne.request import SamplingParams

    monkeypatch.setattr(llama, "FUSED_SWIGLU_BLOCK", 32)
    results = []
    for on in (True, False):
        llm = LLM("dummy:tiny", device="cpu", dtype="float32", fused_swiglu=on)
        try:
            mlps = [m for m in llm.engine.executor.worker.model.modules() if isinstance(m, llama.LlamaMLP)]
            assert mlps and all(m.interleave == (32 if on else None) for m in mlps)
            out = llm.generate([[5, 6, 7, 8, 9] * 7], SamplingParams(max_tokens=8, temperature=0.0, logprobs=1))
            results.append([(c.token_ids, c.logprobs) for o in out for c in o.outputs])
        finally:
            llm.engine.shutdown()
    (tokens_on, logprobs_on), (tokens_off, logprobs_off) = results[0][0], results[1][0]
    assert tokens_on == tokens_off and len(logprobs_on) == len(logprobs_off) == 8
    for a, b in zip(logprobs_on, logprobs_off, strict=True):
        assert a.top_token_ids == b.top_token_ids
        torch.testing.assert_close(torch.tensor([a.logprob, *a.top_logprobs]),
                                   torch.tensor([b.logprob, *b.top_logprobs]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags,expected", [([], True), (["--fused-swiglu"], True), (["--no-fused-swiglu"], False)])
def test_the_flag_reaches_the_config(flags, expected):
    from mnemosyne.cli import build_parser, engine_config

    args = build_parser().parse_args(["generate", *flags])
    assert engine_config(args).fused_swiglu is expected
