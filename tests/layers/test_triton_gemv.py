"""The one-row Triton GEMV against float32 F.linear, and the linears' dispatch to it. Kernel tests are
marked `triton`: on a GPU, or on the CPU under TRITON_INTERPRET=1. Tolerance: one unit in the last
place of the output's dtype (rtol 2^-7 for bf16, 2^-10 for fp16; the GPU rounds to nearest, half a
unit, but the interpreter truncates float32 to bf16), plus 1e-3 for float32 summation order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.layers import linear as linear_module

DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-5}
# Llama-3-8B's projections [N, K] scaled down 32 times: qkv, o, gate_up, down
LLAMA_SHAPES = [(192, 128), (128, 128), (896, 128), (128, 448)]
# every config's unmasked path (K a multiple of its splits' columns), and rows / columns that fall outside
EVEN_SHAPES = [(64, 1024), (32, 2048)]
ODD_SHAPES = [(37, 1000), (5, 1537), (1, 64)]


def _inputs(n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(1, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    return x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def _check(out: torch.Tensor, x, w, b, dtype: torch.dtype) -> None:
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out.float(), want, atol=1e-3, rtol=ULP[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("shape", LLAMA_SHAPES + EVEN_SHAPES + ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config_matches_float32_linear(dtype, shape, has_bias, triton_device):
    from mnemosyne.layers.triton_gemv import CONFIGS, gemv

    x, w, b = _inputs(*shape, dtype, triton_device)
    b = b if has_bias else None
    for config in [None, *CONFIGS.values()]:  # None: the default rule
        _check(gemv(x, w, b, config=config), x, w, b, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("config", ["n8_k512_w4_s1", "n8_k512_w4_s4"])
def test_float32_output_is_the_unrounded_sum(config, triton_device):
    """The row-parallel path at tp > 1 all-reduces float32 partial sums: no rounding to bf16."""
    from mnemosyne.layers.triton_gemv import CONFIGS, gemv

    x, w, _ = _inputs(48, 2048, torch.bfloat16, triton_device)
    _check(gemv(x, w, out_dtype=torch.float32, config=CONFIGS[config]), x, w, None, torch.float32)


def test_default_config_is_the_measured_rule():
    pytest.importorskip("triton")
    from mnemosyne.layers.triton_gemv import CONFIGS, default_config

    assert default_config(6144, 4096).name == "n4_k1024_w4_s1"  # q/k/v, and gate_up, at any tp
    assert default_config(4096, 14336).name == "n16_k1024_w8_s1"  # down at tp=1: a long K
    assert default_config(4096, 3584).name == "n8_k512_w4_s1"  # down at tp=4: K not in 1024s
    assert default_config(64, 64).name == "n8_k512_w4_s1"
    assert all(default_config(n, k) in CONFIGS.values() for n in (64, 1536, 28672) for k in (1024, 4096, 8192))


def test_gemv_rejects_what_it_cannot_compute():
    pytest.importorskip("triton")
    from mnemosyne.layers.triton_gemv import gemv

    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    for x in (torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(1, 32, dtype=torch.bfloat16),
              torch.zeros(1, 64, dtype=torch.float16), torch.zeros(1, 128, dtype=torch.bfloat16)[:, ::2]):
        with pytest.raises(ValueError, match="gemv takes"):
            gemv(x, w)


# --- dispatch from the parallel linears (CPU) -------------------------------------------------


def test_linears_fall_back_to_torch_off_cuda_with_the_gemv_on():
    """Built with one_row_gemv, a CPU row still goes to F.linear (and the Triton module is never imported)."""
    from mnemosyne.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=gen, dtype=torch.float32).bfloat16()
    column = ColumnParallelLinear(64, [48], bias=True, one_row_gemv=True).bfloat16()
    qkv = QKVParallelLinear(64, 16, 4, 2, one_row_gemv=True).bfloat16()
    row = RowParallelLinear(64, 32, one_row_gemv=True).bfloat16()
    for layer in (column, qkv, row):
        for p in layer.parameters():
            p.data.normal_(generator=gen)
    torch.testing.assert_close(column(x), F.linear(x, column.weight, column.bias), atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(qkv(x), dim=-1), F.linear(x, qkv.weight), atol=0, rtol=0)
    torch.testing.assert_close(row(x), F.linear(x, row.weight), atol=0, rtol=0)
    assert linear_module.linear(x, row.weight, out_dtype=torch.float32, one_row_gemv=True).dtype == torch.float32


@pytest.mark.gpu
def test_one_cuda_row_goes_to_the_gemv_also_in_a_cuda_graph(monkeypatch):
    from mnemosyne.layers import triton_gemv
    from mnemosyne.layers.linear import ColumnParallelLinear

    rows = []
    gemv = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, *args: rows.append(x.shape[0]) or gemv(x, *args))
    layer = ColumnParallelLinear(512, [384], bias=True, one_row_gemv=True).cuda().bfloat16()
    for p in layer.parameters():
        p.data.normal_()
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and rows == []  # two rows: cuBLAS
    _check(layer(x[:1]), x[:1], layer.weight, layer.bias, torch.bfloat16)
    _check(linear_module.linear(x[:1], layer.weight, out_dtype=torch.float32, one_row_gemv=True), x[:1],
           layer.weight, None, torch.float32)
    assert rows == [1, 1]
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = layer(x[:1])
    x[:1].normal_()
    graph.replay()
    _check(out, x[:1], layer.weight, layer.bias, torch.bfloat16)


def test_the_worker_builds_its_linears_with_the_configs_choice():
    from mnemosyne.config import EngineConfig
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    for on in (True, False):
        engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", triton_gemv=on))
        try:
            linears = [m for m in engine.executor.worker.model.modules()
                       if isinstance(m, ColumnParallelLinear | QKVParallelLinear | RowParallelLinear)]
            assert linears and all(m.one_row_gemv is on for m in linears)
        finally:
            engine.shutdown()


@pytest.mark.parametrize("flags,expected", [([], True), (["--triton-gemv"], True), (["--no-triton-gemv"], False)])
def test_the_flag_reaches_the_config(flags, expected):
    from mnemosyne.cli import build_parser, engine_config

    args = build_parser().parse_args(["generate", *flags])
    assert engine_config(args).triton_gemv is expected
