"""The MLP's gate/up GEMM with SiLU × up in its epilogue (`layers/triton_swiglu.py`) against cuBLAS and
the separate SiLU × up kernel, at Llama-3-8B's shapes (hidden 4096, intermediate 14336):

- numerics of both against float32 at a few row counts (one not a multiple of any tile);
- each config's time at a prefill chunk's rows, run back to back for seconds as a prefill runs it (the
  device then sits at its power limit, where cuBLAS's 8192³ rate is 85% of its burst), with the SM clock
  and board power, the unfused path timed before, between and after them;
- the chosen config against the unfused path by row count (FUSED_SWIGLU_MIN_ROWS).

    python benchmarks/swiglu_gemm.py [--rows 32768] [--seconds 1.5] [-o swiglu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F
from benchmarks.gpu_kernels import ClockSampler, sustained

from mnemosyne.bench.floors import measure_ceilings

HIDDEN, INTER = 4096, 14336
DT = torch.bfloat16


def configs() -> dict[str, object]:
    from mnemosyne.layers.triton_swiglu import SwigluConfig

    table = {}
    for bm, bn, bk, stages, warps, group, ws in [
            (128, 128, 64, 3, 8, 8, False), (128, 128, 64, 4, 8, 8, False), (128, 128, 64, 3, 8, 16, False),
            (128, 64, 64, 4, 4, 8, False), (128, 64, 64, 5, 8, 8, False), (64, 128, 64, 4, 4, 8, False),
            (256, 64, 64, 3, 8, 8, False), (128, 128, 64, 3, 8, 8, True)]:
        name = f"m{bm}_n{bn}_k{bk}_s{stages}_w{warps}_g{group}" + ("_ws" if ws else "")
        table[name] = SwigluConfig(bm, bn, bk, group, stages, warps, ws)
    return table


def single_dot():
    """Triton's own ceiling here: one dot per k-step over a [2 * BLOCK_N, BLOCK_K] weight tile, the weight's
    gate and up rows interleaved in blocks of BLOCK_N so that a tile holds both halves of its outputs.
    FUSE: silu(gate) * up from the tile's halves; else the plain GEMM (the whole tile stored)."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from mnemosyne.layers.triton_swiglu import _tile

    @triton.jit(do_not_specialize=["M"])
    def kernel(x_desc, w_desc, out_desc, M, N2, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FUSE: tl.constexpr):
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N2, 2 * BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        dtype = out_desc.dtype
        tile_out = start - NUM_SMS
        for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for kk in range(k_tiles):
                acc = tl.dot(x_desc.load([pid_m * BLOCK_M, kk * BLOCK_K]),
                             w_desc.load([pid_n * 2 * BLOCK_N, kk * BLOCK_K]).T, acc)
            tile_out += NUM_SMS
            pid_m, pid_n = _tile(tile_out, num_pid_m, num_pid_n, GROUP_M)
            if FUSE:
                gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
                g = gate.to(dtype).to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
                out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (act * up.to(dtype).to(tl.float32)).to(dtype))
            else:
                out_desc.store([pid_m * BLOCK_M, pid_n * 2 * BLOCK_N], acc.to(dtype))

    def run(x, w_il, fuse: bool, bm=128, bn=128, bk=64, stages=3, warps=8, group=8):
        rows, k = x.shape
        n2 = w_il.shape[0]
        out = torch.empty(rows, n2 // 2 if fuse else n2, dtype=x.dtype, device=x.device)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        tiles = triton.cdiv(rows, bm) * triton.cdiv(n2, 2 * bn)
        kernel[(min(sms, tiles),)](TensorDescriptor.from_tensor(x, [bm, bk]),
                                   TensorDescriptor.from_tensor(w_il, [2 * bn, bk]),
                                   TensorDescriptor.from_tensor(out, [bm, bn if fuse else 2 * bn]),
                                   rows, n2, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, NUM_SMS=sms,
                                   FUSE=fuse, num_stages=stages, num_warps=warps)
        return out

    return run


def interleave(w: torch.Tensor, block: int) -> torch.Tensor:
    """[gate; up] -> blocks of `block` gate rows, then the same rows of up, and so on."""
    inter = w.shape[0] // 2
    return w.view(2, inter // block, block, -1).transpose(0, 1).reshape(2 * inter, -1).contiguous()


def unfused(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from mnemosyne.layers.triton_ops import silu_and_mul

    return silu_and_mul(F.linear(x, w))


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    return F.silu(gate) * up


def numerics(w: torch.Tensor, table: dict) -> list[dict]:
    from mnemosyne.layers.triton_swiglu import DEFAULT, gate_up_silu

    rows_out = []
    print("numerics against float32 (max |error| / max |reference|; share of outputs that differ from the "
          "unfused path's)")
    for rows in (1000, 4096, 16384):
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=DT)
        ref = reference(x, w)
        scale = ref.abs().max().item()
        base = unfused(x, w)
        row = {"rows": rows, "unfused": (base.float() - ref).abs().max().item() / scale}
        for name, config in {"default": DEFAULT, **table}.items():
            try:
                out = gate_up_silu(x, w, config)
            except Exception as e:  # a config the device cannot hold (shared memory) is reported, not fatal
                row[name] = f"{type(e).__name__}: {str(e)[:80]}"
                continue
            row[name] = (out.float() - ref).abs().max().item() / scale
            row[name + "_differ"] = (out != base).float().mean().item()
        print(f"  rows {rows}: unfused {row['unfused']:.2e}; "
              + "; ".join(f"{k} {v:.2e} ({row[k + '_differ']:.1%})" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if k not in ("rows", "unfused") and not k.endswith("_differ")))
        rows_out.append(row)
        del x, ref, base
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
    p.add_argument("--single-dot-only", action="store_true",
                   help="skip the numerics, the two-accumulator configs and the rows sweep")
    p.add_argument("-o", "--output")
    args = p.parse_args()
    from mnemosyne.layers.triton_ops import silu_and_mul
    from mnemosyne.layers.triton_swiglu import gate_up_silu

    ceilings = measure_ceilings(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s, "
          f"copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (burst, as every bench measures them)")
    w = torch.randn(2 * INTER, HIDDEN, device="cuda", dtype=DT) / HIDDEN ** 0.5
    table = configs()
    if args.single_dot_only:
        table = {}
    result = {"device": torch.cuda.get_device_name(), "matmul_tflops": ceilings.matmul_flops_per_s / 1e12,
              "numerics": numerics(w, table) if table else []}

    sampler = ClockSampler()
    x = torch.randn(args.rows, HIDDEN, device="cuda", dtype=DT)
    flops = 2 * args.rows * HIDDEN * 2 * INTER
    gate_up = F.linear(x, w)
    print(f"\n[{args.rows}, {HIDDEN}] x {2 * INTER}, back to back for {args.seconds} s each (power limit "
          f"{sampler.power_limit_w:.0f} W); TFLOP/s counts the GEMM's FLOPs")
    print(f"  {'variant':<34} {'ms first':>9} {'ms late':>8} {'TFLOP/s':>8} {'SM MHz':>7} {'W':>5}")
    timings: dict[str, dict] = {}

    def run(name: str, fn) -> None:
        try:
            fn()
            t = timed(sampler, fn, flops, args.seconds)
        except Exception as e:
            print(f"  {name:<34} failed: {type(e).__name__}: {str(e)[:100]}")
            return
        timings.setdefault(name, []).append(t)
        print(f"  {name:<34} {t['ms_first']:9.2f} {t['ms']:8.2f} {flops / t['ms'] / 1e9:8.0f} {t['mhz']:7.0f} "
              f"{t['w']:5.0f}")

    run("cuBLAS gate_up alone", lambda: F.linear(x, w))
    run("SiLU x up kernel alone", lambda g=gate_up: silu_and_mul(g))
    del gate_up
    run("unfused (cuBLAS + kernel)", lambda: unfused(x, w))
    for i, (name, config) in enumerate(table.items()):
        run(name, lambda config=config: gate_up_silu(x, w, config))
        if i % 3 == 2:
            run("unfused (cuBLAS + kernel)", lambda: unfused(x, w))
    run("unfused (cuBLAS + kernel)", lambda: unfused(x, w))
    sd = single_dot()
    for bn, stages in ((128, 3), (128, 4), (64, 4)):
        w_il = interleave(w, bn)
        check = sd(x[:4096], w_il, True, bn=bn, stages=stages)
        err = (check.float() - unfused(x[:4096], w).float()).abs().max().item()
        run(f"single dot, plain GEMM, n{2 * bn} s{stages}", lambda w_il=w_il, bn=bn, stages=stages:
            sd(x, w_il, False, bn=bn, stages=stages))
        run(f"single dot, fused, n{2 * bn} s{stages} (err {err:.0e})", lambda w_il=w_il, bn=bn, stages=stages:
            sd(x, w_il, True, bn=bn, stages=stages))
        del w_il
    run("unfused (cuBLAS + kernel)", lambda: unfused(x, w))
    best = min((n for n in table if n in timings), key=lambda n: min(t["ms"] for t in timings[n]), default=None)
    base_ms = sorted(t["ms"] for t in timings["unfused (cuBLAS + kernel)"])
    result.update(rows=args.rows, timings=timings, best=best)
    if best is not None:
        best_ms = min(t["ms"] for t in timings[best])
        print(f"best: {best} {best_ms:.2f} ms against unfused {base_ms[len(base_ms) // 2]:.2f} ms (median of "
              f"{len(base_ms)}): {base_ms[len(base_ms) // 2] / best_ms:.3f}x")
        print("\nby rows, the best config against the unfused path (back to back, 0.5 s each), ms")
        by_rows = []
        for rows in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
            xr = x[:rows].contiguous()
            f = 2 * rows * HIDDEN * 2 * INTER
            a = timed(sampler, lambda xr=xr: unfused(xr, w), f, 0.5)["ms"]
            b = timed(sampler, lambda xr=xr: gate_up_silu(xr, w, table[best]), f, 0.5)["ms"]
            by_rows.append({"rows": rows, "unfused_ms": a, "fused_ms": b})
            print(f"  {rows:6d}: unfused {a:8.3f}  fused {b:8.3f}  {a / b:6.3f}x")
        result["by_rows"] = by_rows
        result["best_config"] = dataclasses.asdict(table[best])
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
