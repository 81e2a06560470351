"""The MLP's gate/up GEMM with SiLU × up in its epilogue (`layers/triton_swiglu.py`) against cuBLAS and
the separate SiLU × up kernel, at Llama-3-8B's shapes (hidden 4096, intermediate 14336):

- numerics of both against float32 at a few row counts (one not a multiple of a tile);
- both at a prefill chunk's rows, run back to back for seconds as a prefill runs them (the device then
  sits at its power limit, where cuBLAS's 8192³ rate is 85% of its burst), with the SM clock and board
  power, alternating;
- both by row count, which sets FUSED_SWIGLU_MIN_ROWS.

    python benchmarks/swiglu_gemm.py [--rows 32768] [--seconds 1.5] [-o swiglu.json]

The kernels of calls 109-110 (two accumulators, one per half: 512 TFLOP/s; Triton's plain GEMM on the
same tiles: 692, as cuBLAS) are in this file's history (commits d1d7d55 and 29a62be).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from benchmarks.gpu_kernels import ClockSampler, sustained

from mnemosyne.bench.floors import measure_ceilings
from mnemosyne.layers.linear import ColumnParallelLinear

HIDDEN, INTER = 4096, 14336
DT = torch.bfloat16


def engine_layout(w: torch.Tensor, block: int) -> torch.Tensor:
    """[gate; up] as the worker lays it out with --fused-swiglu: loaded through ColumnParallelLinear with
    `interleave`, gate and up rows alternating in blocks of `block`."""
    inter = w.shape[0] // 2
    with torch.device(w.device):
        layer = ColumnParallelLinear(w.shape[1], [inter, inter], interleave=block).to(w.dtype)
    for part, rows in enumerate(w.chunk(2)):
        layer.weight.weight_loader(layer.weight, rows, part)
    return layer.weight.data


def unfused(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from mnemosyne.layers.triton_ops import silu_and_mul

    return silu_and_mul(F.linear(x, w))


def numerics(w: torch.Tensor, w_il: torch.Tensor) -> list[dict]:
    from mnemosyne.layers.triton_swiglu import gate_up_silu

    rows_out = []
    print("numerics against float32: max |error| / max |reference|; the share of outputs that differ from "
          "the unfused path's")
    for rows in (1000, 4096, 16384):
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=DT)
        gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
        ref = F.silu(gate) * up
        scale = ref.abs().max().item()
        base, fused = unfused(x, w), gate_up_silu(x, w_il)
        row = {"rows": rows, "unfused": (base.float() - ref).abs().max().item() / scale,
               "fused": (fused.float() - ref).abs().max().item() / scale,
               "differ": (fused != base).float().mean().item()}
        print(f"  rows {rows:6d}: unfused {row['unfused']:.2e}  fused {row['fused']:.2e}  differ {row['differ']:.2%}")
        rows_out.append(row)
        del x, gate, up, ref, base, fused
    return rows_out


def timed(sampler: ClockSampler, fn, flops: float, seconds: float) -> dict[str, float]:
    with sampler:
        r = sustained(fn, flops, seconds)
    clock, power = sampler.late()
    return {"ms_first": flops / r["first"] * 1e3, "ms": flops / r["late"] * 1e3, "mhz": clock, "w": power}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("-o", "--output")
    args = p.parse_args()
    from mnemosyne.layers.triton_ops import silu_and_mul
    from mnemosyne.layers.triton_swiglu import BLOCK_N, gate_up_silu

    ceilings = measure_ceilings(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s, "
          f"copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (burst, as every bench measures them)")
    w = torch.randn(2 * INTER, HIDDEN, device="cuda", dtype=DT) / HIDDEN ** 0.5
    w_il = engine_layout(w, BLOCK_N)
    result = {"device": torch.cuda.get_device_name(), "matmul_tflops": ceilings.matmul_flops_per_s / 1e12,
              "numerics": numerics(w, w_il)}

    sampler = ClockSampler()
    x = torch.randn(args.rows, HIDDEN, device="cuda", dtype=DT)
    flops = 2 * args.rows * HIDDEN * 2 * INTER
    print(f"\n[{args.rows}, {HIDDEN}] x {2 * INTER}, back to back for {args.seconds} s each (power limit "
          f"{sampler.power_limit_w:.0f} W); TFLOP/s counts the GEMM's FLOPs")
    print(f"  {'variant':<28} {'ms first':>9} {'ms late':>8} {'TFLOP/s':>8} {'SM MHz':>7} {'W':>5}")
    timings: dict[str, list[dict]] = {}

    def run(name: str, fn) -> None:
        fn()
        t = timed(sampler, fn, flops, args.seconds)
        timings.setdefault(name, []).append(t)
        print(f"  {name:<28} {t['ms_first']:9.2f} {t['ms']:8.2f} {flops / t['ms'] / 1e9:8.0f} {t['mhz']:7.0f} "
              f"{t['w']:5.0f}")

    gate_up = F.linear(x, w)
    run("cuBLAS gate_up alone", lambda: F.linear(x, w))
    run("SiLU x up kernel alone", lambda g=gate_up: silu_and_mul(g))
    del gate_up
    for _ in range(3):
        run("unfused (cuBLAS + kernel)", lambda: unfused(x, w))
        run("fused", lambda: gate_up_silu(x, w_il))
    medians = {name: sorted(t["ms"] for t in ts)[len(ts) // 2] for name, ts in timings.items()}
    print(f"fused {medians['fused']:.2f} ms against unfused {medians['unfused (cuBLAS + kernel)']:.2f} ms "
          f"(medians of 3): {medians['unfused (cuBLAS + kernel)'] / medians['fused']:.3f}x")

    print("\nby rows (back to back, 0.5 s each), ms")
    by_rows = []
    for rows in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
        xr = x[:rows].contiguous()
        f = 2 * rows * HIDDEN * 2 * INTER
        a = timed(sampler, lambda xr=xr: unfused(xr, w), f, 0.5)["ms"]
        b = timed(sampler, lambda xr=xr: gate_up_silu(xr, w_il), f, 0.5)["ms"]
        by_rows.append({"rows": rows, "unfused_ms": a, "fused_ms": b})
        print(f"  {rows:6d}: unfused {a:8.3f}  fused {b:8.3f}  {a / b:6.3f}x")
    result.update(rows=args.rows, timings=timings, medians=medians, by_rows=by_rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
