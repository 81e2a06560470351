"""The device's own ceilings, measured in the same run as the benchmark, and the floors derived
from them: the FLOP floor of a prefill and the bytes floor of a decode step."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from mnemosyne.config import ModelConfig


@dataclass(frozen=True)
class Ceilings:
    matmul_flops_per_s: float
    """bf16 dense matmul rate (8192³), FLOP/s."""
    copy_bytes_per_s: float
    """Device-to-device copy, bytes read plus written per second."""


def time_s(fn, repeats: int) -> float:
    """Mean seconds of fn() on the current CUDA stream, after three warm-up calls (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure_ceilings(device: torch.device) -> Ceilings:
    n, num_bytes = 8192, 1 << 30
    matmul_s = time_s(functools.partial(torch.matmul, *torch.randn(2, n, n, device=device, dtype=torch.bfloat16)), 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    copy_s = time_s(functools.partial(torch.empty_like(src).copy_, src), 20)
    torch.cuda.empty_cache()
    return Ceilings(2 * n**3 / matmul_s, 2 * num_bytes / copy_s)


def busy_cycles(ms: float) -> int:
    """Cycles of `torch.cuda._sleep` that keep the current device busy for about `ms` milliseconds,
    measured here: the busy kernel behind which a host-side call shows whether it waits for the device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # the first call loads the kernel
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    return int(50_000_000 / start.elapsed_time(end) * ms)


T = TypeVar("T")


def behind_busy_device(fn: Callable[[], T], cycles: int) -> tuple[T, float, bool]:
    """fn's result, its host ms, and whether the busy kernel of `cycles` queued before it had finished
    when it returned (the host waited for the device, or launched more than the device's queue holds)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    result = fn()
    host_ms = (time.perf_counter() - start) * 1e3
    waited = busy.query()
    torch.cuda.synchronize()
    return result, host_ms, waited


def prefill_flops(cfg: ModelConfig, num_tokens: int) -> float:
    """F = 2·P·L + 2·n_layers·(n_heads·head_dim)·L² for a causal prefill of L tokens."""
    return (2 * cfg.num_params_non_embedding * num_tokens
            + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * num_tokens**2)


def decode_bytes(cfg: ModelConfig, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """Bytes one decode step must read: every weight once (the LM head included, the embedding
    only for its rows) plus each request's whole KV cache."""
    weights = cfg.num_params_non_embedding + cfg.vocab_size * cfg.hidden_size
    kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    return (weights + kv) * dtype_bytes
