"""The GPU backend's choice between its chunk kernels, and what cuDNN's tiles make a chunk cost,
against call73's measurements on an H200 (`benchmarks/gpu_kernels.py --only routing`)."""

from __future__ import annotations

import pytest

from mnemosyne.attention.routing import cudnn_cost_tokens, cudnn_wave_tokens, routes_to_triton

SERVING_SPLIT = 8192
GROUP = 4  # Llama-3-8B: 32 q heads over 8 kv heads


# (chunk tokens, prefix tokens, the faster path measured; ms per layer, cuDNN against Triton)
MEASURED = [
    (1024, 0, "triton"),       # 0.334 / 0.078
    (1536, 0, "triton"),       # 0.246 / 0.211
    (1024, 4096, "triton"),    # 0.437 / 0.409
    (1536, 4096, "cudnn"),     # 0.431 / 0.564
    (512, 8192, "triton"),     # 0.569 / 0.325
    (1024, 8192, "cudnn"),     # 0.575 / 0.639
    (320, 16384, "triton"),    # 0.424 / 0.399
    (384, 16384, "cudnn"),     # 0.429 / 0.468
    (224, 24576, "triton"),    # 0.436 / 0.396
    (256, 24576, "cudnn"),     # 0.437 / 0.442
    (224, 65536, "triton"),    # 1.012 / 1.000
    (256, 65536, "cudnn"),     # 1.014 / 1.104
    (512, 131072, "cudnn"),    # 2.020 / 3.953
]


@pytest.mark.parametrize(("num_new", "prefix", "faster"), MEASURED)
def test_serving_routes_each_chunk_to_the_kernel_measured_faster(num_new, prefix, faster):
    assert routes_to_triton(num_new, GROUP, prefix, SERVING_SPLIT) == (faster == "triton")


def test_the_split_still_bounds_the_triton_kernel():
    assert not routes_to_triton(2049, GROUP, 0, SERVING_SPLIT)
    lone = 512  # rows, without a TBT SLO
    assert routes_to_triton(128, GROUP, 0, lone) and not routes_to_triton(129, GROUP, 0, lone)


def test_a_cudnn_chunk_costs_whole_waves_of_tiles():
    # 32 q heads on 132 SMs: 4 tiles of 128 rows per head fill a wave, 512 tokens
    assert cudnn_wave_tokens(32, 132) == 512 and cudnn_wave_tokens(16, 132) == 1024
    # call73 over 64K: 128-512 tokens 1.01-1.05 ms, 640 and 768 tokens 1.87, 1024 2.03, 1536 2.88
    assert {cudnn_cost_tokens(n, 32, 132) for n in (128, 256, 512)} == {512}
    assert {cudnn_cost_tokens(n, 32, 132) for n in (513, 640, 768, 1024)} == {1024}
    assert cudnn_cost_tokens(1536, 32, 132) == 1536 and cudnn_cost_tokens(8192, 32, 132) == 8192
    assert cudnn_cost_tokens(600, 16, 132) == 1024  # two ranks of tensor parallelism: half the programs
