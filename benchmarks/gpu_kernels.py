"""Attention kernels on the GPU at Llama-3-8B head shapes (32 q heads, 8 kv heads, d=128, bf16),
against the ceilings DEVICE.md lists: decode KV-read bandwidth of the Triton paged kernel, TFLOP/s
of a prefill chunk over a long prefix through the cuDNN path (prefix + causal + merge), and short
chunks through both the cuDNN path and the Triton chunk kernel, to set the threshold between them
(`attention/gpu.py`'s SMALL_CHUNK_ROWS), split policies for decode batches of scattered contexts, and
decode split counts timed inside CUDA graphs, as the engine's decode steps run (`--only splits`: no
host launch time in the figure, which eager timing of a small decode mostly is), and the Triton GEMV
against cuBLAS for one-row linears at Llama-3-8B's projections (`--only gemv`, also in CUDA graphs),
and the prefill's GEMMs and attention in a burst against back to back for seconds, with the SM clock
and board power (`--only gemm`: are they short of the 8192³ ceiling by shape, or by power?).

`--only routing` times serving's two chunk paths over the grid where `attention/gpu.py` chooses between
them (`attention/routing.py`), with cuDNN on the ragged path serving runs
(TORCH_CUDNN_SDPA_AVOID_RECOMPILE), which `--only short` leaves off.

    python benchmarks/gpu_kernels.py [--only decode|scattered|chunk|short|routing|splits|gemv|gemm] [--retune]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics

import torch
import torch.nn.functional as F
from benchmarks.nvml import Poller, visible_handles

from mnemosyne.attention.backend import build_metadata
from mnemosyne.bench.floors import measure_ceilings, time_s

# The kernels import triton, which a CPU-only install lacks: they are imported where they run.

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


def time_ms(fn, repeats: int = 20) -> float:
    return time_s(fn, repeats) * 1e3


def decode_case(batch: int, context: int, sms: int, programs_per_sm: int = 4) -> tuple[float, float]:
    from mnemosyne.attention.triton_decode import num_splits_for, paged_decode

    pages_per = -(-context // PAGE)
    num_slots = batch * pages_per * PAGE
    k = torch.randn(num_slots, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    requests = [(context, 1, list(range(i * pages_per, (i + 1) * pages_per))) for i in range(batch)]
    meta = build_metadata(requests, PAGE, "cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    splits = num_splits_for(batch, HKV, context, sms, programs_per_sm)
    ms = time_ms(lambda: paged_decode(q, k, v, meta.block_tables, meta.rows, meta.seq_lens_tensor, PAGE,
                                      D ** -0.5, splits))
    kv_bytes = 2 * batch * context * HKV * D * 2
    return ms, kv_bytes / ms / 1e9


def chunk_case(chunk: int, prefix: int) -> tuple[float, float]:
    from mnemosyne.attention.gpu import chunk_attention

    k = torch.randn(prefix + chunk, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    q = torch.randn(chunk, HQ, D, device="cuda", dtype=DT)
    runs = ((0, prefix),)
    ms = time_ms(lambda: chunk_attention(q, k[prefix:], v[prefix:], k, v, runs, D ** -0.5), 10)
    flops = 4 * chunk * (prefix + chunk / 2) * HQ * D
    return ms, flops / ms / 1e9


def decode_report(sms: int, bw: float) -> None:
    print("decode (Triton paged, KV read only)")
    for batch, context in ((1, 131072), (1, 1 << 20), (64, 4096), (8, 32768)):
        ms, tbps = decode_case(batch, context, sms)
        print(f"  B={batch:<3} context={context:<8} {ms:7.3f} ms  {tbps:5.2f} TB/s  {tbps / bw:5.1%} of copy")
    print("decode splits sweep, B=1 context=131072 (programs per SM)")
    for per_sm in (1, 2, 4, 8, 16):
        ms, tbps = decode_case(1, 131072, sms, per_sm)
        print(f"  {per_sm:>2} per SM  {ms:7.3f} ms  {tbps:5.2f} TB/s  {tbps / bw:5.1%} of copy")


def scattered_lengths(batch: int, total: int, seed: int = 0) -> list[int]:
    """Contexts of a decode batch as `mnemosyne profile --check` draws them: a few long among short."""
    import random

    rng = random.Random(seed)
    weights = [rng.random() ** 3 for _ in range(batch)]
    return [max(1, int(total * w / sum(weights))) for w in weights]


def decode_policy_case(lengths: list[int], splits: int, min_span: int, device: str = "cuda",
                       dtype: torch.dtype = DT) -> float:
    """ms of one paged decode over requests of these contexts, with this split count and minimum span."""
    from mnemosyne.attention.triton_decode import paged_decode

    pages = [-(-n // PAGE) for n in lengths]
    k = torch.randn(sum(pages) * PAGE, HKV, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    starts = [sum(pages[:i]) for i in range(len(pages))]
    meta = build_metadata([(n, 1, list(range(s, s + p))) for n, s, p in zip(lengths, starts, pages, strict=True)],
                          PAGE, device)
    q = torch.randn(len(lengths), HQ, D, device=device, dtype=dtype)
    def run() -> None:
        paged_decode(q, k, v, meta.block_tables, meta.rows, meta.seq_lens_tensor, PAGE, D ** -0.5, splits, min_span)

    if device != "cuda":  # a smoke test under the Triton interpreter: nothing to time
        run()
        return 0.0
    return time_ms(run)


def scattered_report(sms: int, bw: float) -> None:
    """Split policies for decode batches: the old ones (graphs: from the batch size alone; eager: also
    no split over MAX_SPLIT_TOKENS), the ones now in use (triton_decode.decode_splits and
    graph_decode_splits, with decode_min_span), and fixed counts with a minimum span, which spends
    splits on long rows only. A batch of scattered contexts is where they differ: its longest row is
    otherwise walked by one program per kv head."""
    from mnemosyne.attention.triton_decode import (
        decode_min_span,
        decode_splits,
        graph_decode_splits,
        num_splits_for,
    )

    cases = [("137 scattered, 434K tokens (a profile check batch)", scattered_lengths(137, 434572)),
             ("64 scattered, 262K tokens", scattered_lengths(64, 262144, seed=1)),
             ("one 64K row among 63 of 1K", [65536] + [1024] * 63),
             ("64 x 4K (uniform)", [4096] * 64),
             ("1 x 128K", [131072]),
             ("1 x 4K", [4096])]
    print("decode split policies (ms; TB/s of KV read)")
    for name, lengths in cases:
        batch, longest = len(lengths), max(lengths)
        by_batch = num_splits_for(batch, HKV, longest, sms, by_length=False)
        span = decode_min_span(batch, HKV, sms)
        policies = [("old graphs: batch", by_batch, 0), ("old eager", num_splits_for(batch, HKV, longest, sms), 0),
                    ("graphs now (256K max context)", graph_decode_splits(batch, HKV, 262144, sms), span),
                    ("eager now", decode_splits(batch, HKV, longest, sms, sum(lengths)), span),
                    ("max(batch, 8), span >= 1K", max(by_batch, 8), 1024)]
        kv_bytes = 2 * sum(lengths) * HKV * D * 2
        print(f"  {name}: longest {longest}")
        for label, splits, min_span in policies:
            ms = decode_policy_case(lengths, min(splits, 128), min_span)
            print(f"    {label:32} splits {min(splits, 128):3d}  {ms:7.3f} ms  {kv_bytes / ms / 1e9:5.2f} TB/s "
                  f"({kv_bytes / ms / 1e9 / bw:4.0%} of copy)")


def graph_time_ms(fn, calls: int = 10, replays: int = 20) -> float:
    """Device ms of one fn(), from a CUDA graph of `calls` calls replayed `replays` times (after eager
    warm-up calls, which also tune the kernel)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, replays) / calls


SPLIT_SWEEP = (
    ("1 x 128K (bench latency)", [131072], (33, 64, 66, 128, 132, 256)),
    ("1 x 256K (kvp=4 shard of 1M)", [262144], (66, 128, 132, 192, 256)),
    ("1 x 512K (kvp=4 shard of 2M)", [524288], (66, 128, 132, 256)),
    ("1 x 1M", [1 << 20], (66, 128, 132, 256)),
    ("64 x 4K (bench latency)", [4096] * 64, (1, 2, 3, 4, 8, 32)),
    ("8 x 32K", [32768] * 8, (8, 9, 16, 17, 32, 64, 128)),
)


def splits_report(sms: int, bw: float) -> None:
    """Decode kernel and split merge in CUDA graphs, per split count, with the eager step's and the
    decode graphs' choices marked (graphs: `graph_variant` of a 1M-token engine)."""
    from mnemosyne.attention.triton_decode import (
        decode_min_span,
        decode_splits,
        graph_split_variants,
        graph_variant,
        paged_decode,
    )

    print("decode splits in CUDA graphs (kernel + merge; ms; TB/s of KV read)")
    for name, lengths, candidates in SPLIT_SWEEP:
        batch, longest = len(lengths), max(lengths)
        eager = decode_splits(batch, HKV, longest, sms, sum(lengths))
        graph = graph_variant(graph_split_variants(batch, HKV, 1 << 20, sms), eager, longest)
        span = decode_min_span(batch, HKV, sms)
        pages = [-(-n // PAGE) for n in lengths]
        k = torch.randn(sum(pages) * PAGE, HKV, D, device="cuda", dtype=DT)
        v = torch.randn_like(k)
        starts = [sum(pages[:i]) for i in range(len(pages))]
        meta = build_metadata([(n, 1, list(range(s, s + p))) for n, s, p in zip(lengths, starts, pages, strict=True)],
                              PAGE, "cuda")
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        kv_bytes = 2 * sum(lengths) * HKV * D * 2
        print(f"  {name}: eager {eager} splits, graphs {graph}")
        for splits in sorted({*candidates, eager, graph or eager}):
            ms = graph_time_ms(functools.partial(paged_decode, q, k, v, meta.block_tables, meta.rows,
                                                 meta.seq_lens_tensor, PAGE, D ** -0.5, splits, span))
            marks = " ".join(m for m, n in (("eager", eager), ("graphs", graph)) if n == splits)
            print(f"    splits {splits:3d}  {ms:7.4f} ms  {kv_bytes / ms / 1e9:5.2f} TB/s "
                  f"({kv_bytes / ms / 1e9 / bw:4.0%} of copy)  {marks}")
        del k, v
        torch.cuda.empty_cache()


SHORT_CHUNKS = (8, 16, 32, 64, 128, 256)
SHORT_PREFIXES = (16384, 65536, 262144)


def chunk_bytes_flops(chunk: int, prefix: int) -> tuple[float, float]:
    """K/V bytes read (prefix and chunk, once) and attention FLOP of one chunk over its prefix."""
    return 2 * (prefix + chunk) * HKV * D * 2, 4 * chunk * (prefix + chunk / 2) * HQ * D


def short_case(chunks: list[int], prefix: int, sms: int, programs_per_sm: int = 4,
               retune: bool = False) -> tuple[float, float, str]:
    """(cuDNN path ms, Triton chunk kernel ms, the kernel's config) for chunks of the given lengths,
    each over its own prefix of `prefix` tokens in contiguous pages (cuDNN's best case): the cuDNN
    path runs them one after the other, as GpuBackend did; the kernel in one launch."""
    from mnemosyne.attention.gpu import chunk_attention
    from mnemosyne.attention.triton_chunk import (
        _tuned_chunks_kernel,
        chunk_splits,
        paged_chunks,
        short_chunks,
    )

    pages_per = -(-(prefix + max(chunks)) // PAGE)
    k = torch.randn(len(chunks) * pages_per * PAGE, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    requests = [(prefix + c, c, list(range(i * pages_per, (i + 1) * pages_per))) for i, c in enumerate(chunks)]
    meta = build_metadata(requests, PAGE, "cuda")
    q = torch.randn(sum(chunks), HQ, D, device="cuda", dtype=DT)
    bounds = [(meta.query_start_loc[i], meta.query_start_loc[i + 1], i * pages_per * PAGE) for i in range(len(chunks))]

    def cudnn() -> None:
        for (start, end, base), c in zip(bounds, chunks, strict=True):
            chunk_attention(q[start:end], k[base + prefix:base + prefix + c], v[base + prefix:base + prefix + c],
                            k, v, ((base, base + prefix),) if prefix else (), D ** -0.5)

    table = short_chunks(meta, range(len(chunks)))
    splits = chunk_splits(table, HQ, HKV, sms, programs_per_sm)
    if retune:
        _tuned_chunks_kernel.cache.clear()
    triton_ms = time_ms(lambda: paged_chunks(q, k, v, meta.block_tables, table, PAGE, D ** -0.5, splits))
    cfg = _tuned_chunks_kernel.best_config
    config = f"N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}, {splits} splits"
    return time_ms(cudnn, 10), triton_ms, config


def short_chunks_report(sms: int, retune: bool) -> None:
    print("short chunk over a prefix: cuDNN path (prefix + causal + merge) against the Triton chunk kernel")
    for prefix in SHORT_PREFIXES:
        faster = []
        for chunk in SHORT_CHUNKS:
            cudnn_ms, triton_ms, config = short_case([chunk], prefix, sms, retune=retune)
            kv_bytes, flops = chunk_bytes_flops(chunk, prefix)
            print(f"  C={chunk:<4} P={prefix:<7} cuDNN {cudnn_ms:7.3f} ms {kv_bytes / cudnn_ms / 1e9:5.2f} TB/s "
                  f"{flops / cudnn_ms / 1e9:4.0f} TFLOP/s | Triton {triton_ms:7.3f} ms "
                  f"{kv_bytes / triton_ms / 1e9:5.2f} TB/s {flops / triton_ms / 1e9:4.0f} TFLOP/s "
                  f"({config})  x{cudnn_ms / triton_ms:.2f}")
            faster += [chunk] if triton_ms < cudnn_ms else []
        print(f"  P={prefix}: Triton faster at C in {faster} (query rows per kv head: 4 × C)")
    print("four chunks of 32 in one step, each over 64K (what LARS and adaptive chunking schedule)")
    cudnn_ms, triton_ms, config = short_case([32] * 4, 65536, sms, retune=retune)
    kv_bytes = 4 * chunk_bytes_flops(32, 65536)[0]
    print(f"  cuDNN {cudnn_ms:7.3f} ms | Triton {triton_ms:7.3f} ms {kv_bytes / triton_ms / 1e9:5.2f} TB/s "
          f"({config})  x{cudnn_ms / triton_ms:.2f}")
    print("Triton chunk splits sweep, P=65536 (programs per SM)")
    for chunk in (32, 128):
        for per_sm in (1, 2, 4, 8):
            _, triton_ms, config = short_case([chunk], 65536, sms, per_sm, retune)
            kv_bytes, flops = chunk_bytes_flops(chunk, 65536)
            print(f"  C={chunk:<4} {per_sm:>2} per SM  {triton_ms:7.3f} ms  {kv_bytes / triton_ms / 1e9:5.2f} TB/s "
                  f"{flops / triton_ms / 1e9:4.0f} TFLOP/s ({config})")


ROUTING_CHUNKS = (128, 192, 224, 256, 288, 320, 384, 448, 512, 640, 768, 1024, 1536)
ROUTING_PREFIXES = (0, 4096, 8192, 16384, 24576, 32768, 49152, 65536, 131072)


def routing_report(sms: int) -> None:
    """One chunk over a prefix through each of serving's paths, per layer and for 32 layers: where
    the measured crossover lies against the routing rule in force. Call70/71's step logs disagreed
    with `--only short` (non-ragged cuDNN): a serving step with a 256-token chunk over 24-28K on
    cuDNN took 42-54 ms, one with 224 tokens over 28-33K on Triton 25 ms."""
    from mnemosyne.attention.routing import routes_to_triton
    from mnemosyne.config import SERVING_TRITON_CHUNK_ROWS

    print(f"serving's chunk paths, cuDNN ragged={os.environ.get('TORCH_CUDNN_SDPA_AVOID_RECOMPILE', '0')}: "
          f"ms per layer (x32 layers), and the path attention/routing.py takes")
    print(f"  {'C':>5} {'P':>7} {'cuDNN':>8} {'Triton':>8} {'x32 cuDNN':>10} {'x32 Triton':>10} {'faster':>7} "
          f"{'routed':>7}")
    crossover = {}
    for prefix in ROUTING_PREFIXES:
        for chunk in ROUTING_CHUNKS:
            cudnn_ms, triton_ms, _ = short_case([chunk], prefix, sms)
            faster = "Triton" if triton_ms < cudnn_ms else "cuDNN"
            if faster == "cuDNN":
                crossover.setdefault(prefix, chunk)
            routed = "Triton" if routes_to_triton(chunk, HQ // HKV, prefix, SERVING_TRITON_CHUNK_ROWS) else "cuDNN"
            print(f"  {chunk:>5} {prefix:>7} {cudnn_ms:8.3f} {triton_ms:8.3f} {32 * cudnn_ms:10.2f} "
                  f"{32 * triton_ms:10.2f} {faster:>7} {routed:>7}")
        torch.cuda.empty_cache()
    print("  smallest chunk where cuDNN wins, by prefix:", crossover)


GEMV_SHAPES = (("qkv", 6144, 4096, 0), ("o", 4096, 4096, 1), ("gate_up", 28672, 4096, 0), ("down", 4096, 14336, 1))
"""Llama-3-8B's projections [N, K] and the axis a tensor-parallel rank shards (0: column-, 1: row-parallel)."""
GEMV_CALLS = 20
GEMV_ROTATE_BYTES = 256 << 20
"""Weight copies a graph's calls rotate over, at least this much in all (5 times an H200's L2), so every
call reads its weight from memory, as a decode step does (each layer's weights evict the last's)."""


def gemv_case(n: int, k: int) -> dict[str, tuple[float, float]]:
    """(µs per call, max |error| against a float32 matmul) of each variant at M = 1 for W [n, k] bf16,
    from a CUDA graph of GEMV_CALLS calls over rotating copies of W."""
    from mnemosyne.layers.triton_gemv import CONFIGS, gemv

    copies = min(GEMV_CALLS, max(2, -(-GEMV_ROTATE_BYTES // (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda", dtype=DT) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=DT)
    want = F.linear(x.float(), weights[0].float())
    variants = {"cuBLAS": lambda w: F.linear(x, w), "torch.mv": lambda w: torch.mv(w, x[0])}
    variants |= {name: functools.partial(gemv, x, config=config) for name, config in CONFIGS.items()}
    results = {}
    for name, fn in variants.items():
        error = (fn(weights[0]).float().view(1, n) - want).abs().max().item()
        rotation = itertools.cycle(weights)
        ms = graph_time_ms(lambda fn=fn, rotation=rotation: fn(next(rotation)), calls=GEMV_CALLS)
        results[name] = (ms * 1e3, error)
    del weights
    torch.cuda.empty_cache()
    return results


def gemv_report(bw: float) -> None:
    """M = 1 linears at Llama-3-8B's projections and their tp = 2 and 4 shards: cuBLAS, torch.mv and
    every configuration of the Triton GEMV, in µs per call and TB/s of weight read; the winner of each
    shape and what `triton_gemv.default_config` picks, the rule the engine runs (`--no-triton-gemv`:
    cuBLAS)."""
    from mnemosyne.layers.triton_gemv import default_config

    print(f"GEMV at M=1, bf16, in CUDA graphs of {GEMV_CALLS} calls: µs per call and TB/s of weight read "
          f"(copy: {bw:.2f})")
    print(f"  {'shape':<27} {'cuBLAS':>11} {'torch.mv':>11}  {'best Triton':<27} {'default Triton':<27} winner")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for tp in (1, 2, 4):
        for proj, n, k, axis in GEMV_SHAPES:
            n, k = (n // tp, k) if axis == 0 else (n, k // tp)
            results = table[f"{proj}/{tp}"] = gemv_case(n, k)

            def cell(name: str, results=results, n=n, k=k) -> str:
                return f"{results[name][0]:5.1f} {n * k * 2 / results[name][0] / 1e6:4.2f}"

            best = min((m for m in results if m not in ("cuBLAS", "torch.mv")), key=lambda m: results[m][0])
            default = default_config(n, k).name
            winner = min(results, key=lambda m: results[m][0])
            print(f"  {f'{proj} tp={tp} [{n}, {k}]':<27} {cell('cuBLAS'):>11} {cell('torch.mv'):>11}  "
                  f"{best:<15} {cell(best)} {default:<15} {cell(default)} {winner} "
                  f"({results['cuBLAS'][0] / results[winner][0]:.2f}x cuBLAS)")
    print("  every variant, µs per call (shape/tp), and its largest |error| against a float32 matmul")
    print(f"    {'':<16}" + "".join(f"{label:>10}" for label in table) + "  max |error|")
    for name in next(iter(table.values())):
        print(f"    {name:<16}" + "".join(f"{r[name][0]:10.1f}" for r in table.values())
              + f"  {max(r[name][1] for r in table.values()):.1e}")


class ClockSampler(Poller):
    """The current GPU's SM clock (MHz) and board power (W) every 20 ms through NVML, while in a `with`."""

    def __init__(self, period_s: float = 0.02):
        super().__init__(period_s)
        self._nvml, handles = visible_handles()
        self._handle = handles[torch.cuda.current_device()]
        self.power_limit_w = self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1e3
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> ClockSampler:
        self.samples = []
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def sample(self) -> None:
        nvml = self._nvml
        self.samples.append((nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM),
                             nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3))

    def late(self) -> tuple[float, float]:
        """Median SM clock and power over the second half of the samples (once the load has settled)."""
        tail = self.samples[len(self.samples) // 2:] or [(float("nan"), float("nan"))]
        return statistics.median(c for c, _ in tail), statistics.median(w for _, w in tail)


def sustained(fn, flops: float, seconds: float) -> dict[str, float]:
    """fn run back to back for about `seconds`, timed in windows of CUDA events: the rate of the first
    window (the device fresh from idle) and the median rate of the windows in the second half."""
    per_window = max(1, round(0.025 / max(time_s(fn, 3), 1e-6)))  # windows of about 25 ms
    windows = max(4, round(seconds / 0.025))
    events = [torch.cuda.Event(enable_timing=True) for _ in range(windows + 1)]
    events[0].record()
    for i in range(windows):
        for _ in range(per_window):
            fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    rates = [flops * per_window / (a.elapsed_time(b) / 1e3) for a, b in itertools.pairwise(events)]
    late = sorted(rates[windows // 2:])
    return {"first": rates[0], "late": late[len(late) // 2]}


GEMM_ROWS = 32768
"""Rows of the prefill GEMMs timed: the 128K prefill's chunk (bench latency's default cap)."""


def gemm_report(matmul_tflops: float) -> None:
    """Whether the prefill's GEMMs and attention fall short of the 8192³ ceiling because of their shapes
    or because the device slows under sustained load: each timed fresh (a burst, as the ceiling and the
    anatomy time them) and back to back for seconds (as a prefill runs them), with the SM clock and
    board power meanwhile; the GEMMs three ways (F.linear on [N, K] weights as the engine runs them,
    matmul on [K, N] weights, and F.linear with cuBLASLt preferred)."""
    sampler = ClockSampler()
    n = 8192
    a, b = torch.randn(2, n, n, device="cuda", dtype=DT)
    with sampler:
        r = sustained(functools.partial(torch.matmul, a, b), 2 * n**3, 4.0)
    clock, power = sampler.late()
    print(f"bf16 GEMMs: burst against sustained (power limit {sampler.power_limit_w:.0f} W); the run's "
          f"ceiling {matmul_tflops:.0f} TFLOP/s")
    print(f"  {'shape':<36} {'first 25 ms':>12} {'after 2 s':>10} {'SM MHz':>7} {'W':>5}")
    print(f"  {'8192³ matmul':<36} {r['first'] / 1e12:12.0f} {r['late'] / 1e12:10.0f} {clock:7.0f} {power:5.0f}")
    del a, b
    x = torch.randn(GEMM_ROWS, 4096, device="cuda", dtype=DT)
    h = torch.randn(GEMM_ROWS, 14336, device="cuda", dtype=DT)
    shapes = {"qkv": (x, 6144, 4096), "o": (x, 4096, 4096), "gate_up": (x, 28672, 4096), "down": (h, 4096, 14336)}
    for name, (inp, out_features, in_features) in shapes.items():
        w = torch.randn(out_features, in_features, device="cuda", dtype=DT)
        wt = w.t().contiguous()
        flops = 2 * GEMM_ROWS * out_features * in_features
        variants = {"F.linear": lambda inp=inp, w=w: F.linear(inp, w),
                    "matmul [K, N]": lambda inp=inp, wt=wt: torch.matmul(inp, wt),
                    "F.linear, cuBLASLt": lambda inp=inp, w=w: F.linear(inp, w)}
        for variant, fn in variants.items():
            torch.backends.cuda.preferred_blas_library("cublaslt" if "Lt" in variant else "cublas")
            with sampler:
                r = sustained(fn, flops, 2.0)
            clock, power = sampler.late()
            label = f"{name} [{GEMM_ROWS}, {in_features}] x {out_features}, {variant}"
            print(f"  {label:<36} {r['first'] / 1e12:12.0f} {r['late'] / 1e12:10.0f} {clock:7.0f} {power:5.0f}")
        torch.backends.cuda.preferred_blas_library("cublas")
        del w, wt
    del x, h
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("  cuDNN attention, GQA 32/8 heads, d=128, non-causal (a chunk over its prefix), TFLOP/s")
    for chunk, keys in ((2048, 65536), (16384, 65536), (16384, 262144)):
        q = torch.randn(1, HQ, chunk, D, device="cuda", dtype=DT)
        k, v = torch.randn(2, 1, HKV, keys, D, device="cuda", dtype=DT)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), sampler:
            r = sustained(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                          4 * HQ * chunk * keys * D, 2.0)
        clock, power = sampler.late()
        label = f"chunk {chunk} over {keys} keys"
        print(f"  {label:<36} {r['first'] / 1e12:12.0f} {r['late'] / 1e12:10.0f} {clock:7.0f} {power:5.0f}")
        del q, k, v
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("decode", "scattered", "chunk", "short", "routing", "splits", "gemv", "gemm"),
                   help="one section (default: all)")
    p.add_argument("--retune", action="store_true",
                   help="autotune the chunk kernel again for every shape (the engine tunes once per tile height)")
    args = p.parse_args()
    if args.only == "routing":  # before the first cuDNN call: the process reads it once
        os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = "1"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceilings = measure_ceilings(torch.device("cuda"))
    bw = ceilings.copy_bytes_per_s / 1e12
    print(f"{torch.cuda.get_device_name(0)}: copy {bw:.2f} TB/s (read+write), "
          f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s, {sms} SMs")
    if args.only in (None, "decode"):
        decode_report(sms, bw)
    if args.only in (None, "scattered"):
        scattered_report(sms, bw)
    if args.only in (None, "chunk"):
        print("prefill chunk over a prefix (cuDNN, prefix + causal + merge)")
        for chunk, prefix in ((8192, 262144), (1024, 262144), (256, 1 << 20)):
            ms, tflops = chunk_case(chunk, prefix)
            print(f"  chunk={chunk:<5} prefix={prefix:<8} {ms:8.2f} ms  {tflops:6.0f} TFLOP/s")
    if args.only in (None, "short"):
        short_chunks_report(sms, args.retune)
    if args.only == "routing":
        routing_report(sms)
    if args.only in (None, "splits"):
        splits_report(sms, bw)
    if args.only in (None, "gemv"):
        gemv_report(bw)
    if args.only in (None, "gemm"):
        gemm_report(ceilings.matmul_flops_per_s / 1e12)

if __name__ == "__main__":
    main()
