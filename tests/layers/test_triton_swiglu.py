"""The gate/up GEMM with SiLU × up fused (`layers/triton_swiglu.py`) against float32 and against the
unfused path (cuBLAS, then the SiLU × up kernel), and the MLP's dispatch to it. The kernel needs TMA
(compute capability 9.0+): those tests are marked `gpu` and skip on older GPUs.

Tolerance: the fused path rounds as the unfused one does (gate and up to bf16, SiLU to bf16, then the
product), so against float32 it may be off by the same few units in the last place; against the unfused
path it differs only where the two GEMMs' float32 sums, added in different orders, round to neighbouring
bf16 values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.config import ModelConfig
from mnemosyne.distributed.comm import SINGLE

BF16_ULP = 2.0 ** -7


def _needs_tma() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused kernel needs TMA (compute capability 9.0 or later)")


def _operands(rows: int, hidden: int, inter: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(2 * inter, hidden, generator=gen) / hidden ** 0.5
    return x.cuda().bfloat16(), w.cuda().bfloat16()


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden,inter", [(1, 256, 200), (100, 256, 200), (1000, 512, 1024), (4096, 4096, 14336)],
                         ids=lambda v: str(v))
def test_fused_matches_float32_and_the_unfused_path(rows, hidden, inter):
    """Rows and intermediate widths that are not multiples of any tile: TMA's bounds do the masking."""
    _needs_tma()
    from mnemosyne.layers.triton_ops import silu_and_mul
    from mnemosyne.layers.triton_swiglu import DEFAULT, SwigluConfig, gate_up_silu

    x, w = _operands(rows, hidden, inter)
    want = _reference(x, w)
    unfused = silu_and_mul(F.linear(x, w))
    for config in (DEFAULT, SwigluConfig(block_m=64, block_n=64, num_stages=4, num_warps=4)):
        out = gate_up_silu(x, w, config)
        assert out.shape == (rows, inter) and out.dtype == torch.bfloat16 and out.is_contiguous()
        # the unfused path's own error against float32 bounds the fused one's
        bound = (unfused.float() - want).abs().max().item()
        assert (out.float() - want).abs().max().item() <= 1.5 * bound + 1e-6
        torch.testing.assert_close(out.float(), unfused.float(), rtol=4 * BF16_ULP, atol=1e-3)


@pytest.mark.gpu
def test_zero_rows():
    _needs_tma()
    from mnemosyne.layers.triton_swiglu import gate_up_silu

    x, w = _operands(0, 256, 200)
    assert gate_up_silu(x, w).shape == (0, 200)


def _tiny_mlp(fused: bool):
    from mnemosyne.models.llama import LlamaMLP

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=64)
    mlp = LlamaMLP(cfg, SINGLE, fused_swiglu=fused)
    gen = torch.Generator().manual_seed(1)
    for p in mlp.parameters():
        p.data = (torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5).to(p.dtype)
    return mlp


@pytest.mark.gpu
def test_the_mlp_takes_the_fused_kernel_for_long_inputs_only(monkeypatch):
    """Below FUSED_SWIGLU_MIN_ROWS, and with the flag off, cuBLAS and the separate kernel; in a CUDA graph too."""
    _needs_tma()
    from mnemosyne.layers import triton_swiglu

    calls = []
    fused_fn = triton_swiglu.gate_up_silu
    monkeypatch.setattr(triton_swiglu, "gate_up_silu", lambda x, w: calls.append(x.shape[0]) or fused_fn(x, w))
    on, off = _tiny_mlp(True).cuda().bfloat16(), _tiny_mlp(False).cuda().bfloat16()
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


def test_the_cpu_path_never_imports_triton():
    """The flag on, a CPU input still takes F.silu(gate) * up."""
    mlp = _tiny_mlp(True)
    x = torch.randn(8, 256)
    gate, up = F.linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(gate) * up, mlp.down_proj.weight), atol=1e-6, rtol=1e-6)


def test_the_worker_builds_its_mlps_with_the_configs_choice():
    from mnemosyne.config import EngineConfig
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.models.llama import LlamaMLP

    for on in (True, False):
        engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", fused_swiglu=on))
        try:
            mlps = [m for m in engine.executor.worker.model.modules() if isinstance(m, LlamaMLP)]
            assert mlps and all(m.fused_swiglu is on for m in mlps)
        finally:
            engine.shutdown()


@pytest.mark.parametrize("flags,expected", [([], False), (["--fused-swiglu"], True), (["--no-fused-swiglu"], False)])
def test_the_flag_reaches_the_config(flags, expected):
    from mnemosyne.cli import build_parser, engine_config

    args = build_parser().parse_args(["generate", *flags])
    assert engine_config(args).fused_swiglu is expected
