"""Where a long prefill's time goes, kernel by kernel, without a profiler (which slowed call38's cuDNN
calls 3-4x): one layer's attention and GEMMs at every chunk of a prompt, timed with CUDA events and
multiplied by the layer count, against the FLOP floor of the same run. Attention is timed three ways,
each in its own process so that the first call at each shape pays cuDNN's plan as a prefill would:

- `before`: the chunk path as it was (q copied out of the fused projection, K/V of the chunk expanded
  over the GQA group for the causal part, q folded for the prefix part, one call per whole run);
- `gqa`: cuDNN takes the 8 kv heads natively, q arrives packed from the rotary kernel;
- `gqa+pieces`: the same, with prefix runs cut into power-of-two pieces (`run_pieces`), as the engine
  does with exact plans; the plans of those pieces built first, as the worker's warm-up does.

Then the q fold (the path before) against native GQA for the prefix part by chunk length, and the
numerics of every path (exact plans and cuDNN's ragged path) against float32 attention.

    python benchmarks/prefill_anatomy.py [--context 131072] [--chunk 32768] [-o anatomy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

HQ, HKV, D, LAYERS = 32, 8, 128, 32
HIDDEN, FFN = 4096, 14336
DT = torch.bfloat16
SCALE = D ** -0.5


def events_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _wall_ms(fn) -> float:
    """The first call at a shape: cuDNN builds its plan on the host while the GPU waits, so wall time."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def before_chunk_attention(q, k_new, v_new, k_cache, v_cache, prefix_runs, scale):
    """The chunk path of the seventh session (attention/gpu.py at 60bfd46), kept here to compare."""
    from mnemosyne.attention.gpu import _cudnn
    from mnemosyne.attention.triton_merge import merge_parts

    num_new, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    qh = q.contiguous().transpose(0, 1).unsqueeze(0)
    kh = k_new.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    vh = v_new.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    out, lse = _cudnn(qh, kh, vh, scale, True)
    outs, lses = [out[0].transpose(0, 1)], [lse[0].transpose(0, 1)]
    folded = q.view(num_new, num_kv_heads, group, head_dim).permute(2, 0, 1, 3).contiguous()
    folded = folded.view(1, group * num_new, num_kv_heads, head_dim).transpose(1, 2)
    for start, end in prefix_runs:
        k = k_cache[start:end].permute(1, 0, 2).unsqueeze(0)
        v = v_cache[start:end].permute(1, 0, 2).unsqueeze(0)
        o, lse_run = _cudnn(folded, k, v, scale, False)
        outs.append(o[0].view(num_kv_heads, group, num_new, head_dim).permute(2, 0, 1, 3)
                    .reshape(num_new, num_heads, head_dim))
        lses.append(lse_run[0].view(num_kv_heads, group, num_new).permute(2, 0, 1).reshape(num_new, num_heads))
    out, lse = outs[0], lses[0]
    for part_out, part_lse in zip(outs[1:], lses[1:], strict=True):
        out, lse = merge_parts([out, part_out], [lse, part_lse], out.dtype)
    return out, lse


def attention_variant(variant: str, context: int, chunk: int) -> dict:
    """One process: every chunk of a `context`-token prompt, the first call (cold) and warm calls."""
    from mnemosyne.attention.gpu import chunk_attention

    gen = torch.Generator("cuda").manual_seed(0)
    k_cache = torch.randn(context, HKV, D, device="cuda", dtype=DT, generator=gen)
    v_cache = torch.randn(context, HKV, D, device="cuda", dtype=DT, generator=gen)
    # as the model hands the chunk over: q, k, v views into the fused projection's rows
    qkv = torch.randn(chunk, (HQ + 2 * HKV) * D, device="cuda", dtype=DT, generator=gen)
    q_view = qkv[:, :HQ * D].view(chunk, HQ, D)
    q_packed = q_view.contiguous()  # what the rotary kernel now returns

    def call(prefix: int):
        k_new, v_new = k_cache[prefix:prefix + chunk], v_cache[prefix:prefix + chunk]
        runs = ((0, prefix),) if prefix else ()
        if variant == "before":
            return before_chunk_attention(q_view, k_new, v_new, k_cache, v_cache, runs, SCALE)
        return chunk_attention(q_packed, k_new, v_new, k_cache, v_cache, runs, SCALE,
                               split_runs=variant == "gqa+pieces")

    if variant == "gqa+pieces":  # the worker's warm-up: the chunk over each piece length
        from mnemosyne.attention.gpu import piece_lengths

        for piece in piece_lengths(context - 1):  # every prefix is shorter than the prompt
            chunk_attention(q_packed, k_cache[:chunk], v_cache[:chunk], k_cache, v_cache, ((0, piece),), SCALE,
                            split_runs=True)
    rows = []
    for prefix in range(0, context, chunk):
        cold = _wall_ms(lambda p=prefix: call(p))
        warm = statistics.median(events_ms(lambda p=prefix: call(p), 5))
        flops = 4 * chunk * (prefix + chunk / 2) * HQ * D
        rows.append({"prefix": prefix, "cold_ms": cold, "warm_ms": warm, "tflops": flops / warm / 1e9})
    return {"variant": variant, "rows": rows}


def numerics() -> dict:
    """Every chunk path against float32 attention (K/V expanded, torch's math), at shapes that take the
    fold, native GQA and pieces; in the process's plan mode (exact, or ragged with the env var)."""
    from mnemosyne.attention.gpu import chunk_attention

    gen = torch.Generator("cuda").manual_seed(1)
    errors = {}
    for chunk, prefix, split in ((1024, 10_000, False), (4096, 10_000, False), (4096, 9216, True), (8192, 0, False)):
        k_cache = torch.randn(prefix + chunk, HKV, D, device="cuda", dtype=DT, generator=gen)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(chunk, HQ, D, device="cuda", dtype=DT, generator=gen)
        k_new, v_new = k_cache[prefix:], v_cache[prefix:]
        out, lse = chunk_attention(q, k_new, v_new, k_cache, v_cache, ((0, prefix),) if prefix else (), SCALE,
                                   split_runs=split)
        qf = q.float().transpose(0, 1)[None]
        kf = k_cache.float().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)[None]
        vf = v_cache.float().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)[None]
        mask = torch.ones(chunk, prefix + chunk, dtype=torch.bool, device="cuda").tril(prefix)
        ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=SCALE)[0].transpose(0, 1)
        scores = (qf @ kf.transpose(-1, -2) * SCALE).masked_fill(~mask, float("-inf"))
        ref_lse = torch.logsumexp(scores, dim=-1)[0].transpose(0, 1)
        errors[f"{chunk}x{prefix}{'+pieces' if split else ''}"] = {
            "out_max_abs": (out.float() - ref).abs().max().item(), "lse_max_abs": (lse - ref_lse).abs().max().item()}
    return errors


def fold_sweep(prefix: int = 65536) -> list[dict]:
    """The prefix part alone, folded q against native GQA, by chunk length (warm)."""
    from mnemosyne.attention.gpu import _cudnn

    k_cache = torch.randn(prefix, HKV, D, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    k = k_cache.permute(1, 0, 2).unsqueeze(0)
    v = v_cache.permute(1, 0, 2).unsqueeze(0)
    rows = []
    for chunk in (512, 1024, 2048, 4096, 8192, 16384):
        q = torch.randn(chunk, HQ, D, device="cuda", dtype=DT)

        def folded(q=q, chunk=chunk):
            f = q.view(chunk, HKV, HQ // HKV, D).permute(2, 0, 1, 3).contiguous()
            f = f.view(1, HQ // HKV * chunk, HKV, D).transpose(1, 2)
            o, _ = _cudnn(f, k, v, SCALE, False)
            return o[0].view(HKV, HQ // HKV, chunk, D).permute(2, 0, 1, 3).reshape(chunk, HQ, D)

        def gqa(q=q):
            return _cudnn(q.transpose(0, 1).unsqueeze(0), k, v, SCALE, False)

        flops = 4 * chunk * prefix * HQ * D
        row = {"chunk": chunk}
        for name, fn in (("fold", folded), ("gqa", gqa)):
            fn()
            ms = statistics.median(events_ms(fn, 10))
            row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        rows.append(row)
    return rows


def gemms(chunk: int) -> dict:
    """One layer's four projections at `chunk` rows, cuBLAS through F.linear as the engine runs them."""
    x = torch.randn(chunk, HIDDEN, device="cuda", dtype=DT)
    h = torch.randn(chunk, FFN, device="cuda", dtype=DT)
    shapes = {"qkv": (x, (HQ + 2 * HKV) * D, HIDDEN), "o": (x, HIDDEN, HQ * D), "gate_up": (x, 2 * FFN, HIDDEN),
              "down": (h, HIDDEN, FFN)}
    out = {}
    for name, (inp, n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=DT)
        F.linear(inp, w)
        ms = statistics.median(events_ms(lambda inp=inp, w=w: F.linear(inp, w), 10))
        out[name] = {"ms": ms, "tflops": 2 * chunk * n * k / ms / 1e9}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--chunk", type=int, default=32768)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--numerics", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(attention_variant(args.variant, args.context, args.chunk)))
        return
    if args.numerics:
        print(json.dumps(numerics()))
        return

    from mnemosyne.bench.floors import measure_ceilings, prefill_flops
    from mnemosyne.models.loaders import resolve_model

    ceilings = measure_ceilings(torch.device("cuda"))
    cfg = resolve_model("dummy:llama-3-8b").load_config()
    floor_s = prefill_flops(cfg, args.context) / ceilings.matmul_flops_per_s
    result = {"device": torch.cuda.get_device_name(), "context": args.context, "chunk": args.chunk,
              "matmul_tflops": ceilings.matmul_flops_per_s / 1e12, "floor_s": floor_s, "variants": {}, "numerics": {}}
    here = [sys.executable, os.path.abspath(__file__), "--context", str(args.context), "--chunk", str(args.chunk)]
    for variant in ("before", "gqa", "gqa+pieces"):
        done = subprocess.run([*here, "--variant", variant], capture_output=True, text=True, check=True)
        result["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    for mode, env in (("exact", {}), ("ragged", {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"})):
        done = subprocess.run([*here, "--numerics"], capture_output=True, text=True, check=True,
                              env={**os.environ, **env})
        result["numerics"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
    result["fold_sweep"] = fold_sweep()
    result["gemms"] = gemms(args.chunk)

    num_chunks = -(-args.context // args.chunk)
    gemm_s = sum(g["ms"] for g in result["gemms"].values()) * LAYERS * num_chunks / 1e3
    print(f"{result['device']}: {args.context}-token prompt in {args.chunk}-token chunks; matmul "
          f"{result['matmul_tflops']:.0f} TFLOP/s measured, FLOP floor {floor_s:.2f} s")
    print(f"GEMMs (4 a layer, x{LAYERS} layers x{num_chunks} chunks): {gemm_s:.2f} s; "
          + ", ".join(f"{n} {g['tflops']:.0f}" for n, g in result["gemms"].items()) + " TFLOP/s")
    print(f"attention, x{LAYERS} layers (cold: the first call at each chunk, plan included, then warm):")
    print(f"  {'variant':<12}" + "".join(f"{r['prefix'] // 1024:>8}K" for r in result["variants"]["before"])
          + f"{'warm s':>9}{'+cold s':>9}{'est. TTFT':>10}{'MFU':>6}")
    for variant, rows in result["variants"].items():
        warm_s = sum(r["warm_ms"] for r in rows) * LAYERS / 1e3
        cold_s = sum(r["cold_ms"] - r["warm_ms"] for r in rows) / 1e3  # once per process, not per layer
        ttft = gemm_s + warm_s + cold_s
        result["variants"][variant] = {"rows": rows, "warm_s": warm_s, "cold_extra_s": cold_s, "kernels_s": ttft}
        print(f"  {variant:<12}" + "".join(f"{r['tflops']:>9.0f}" for r in rows)
              + f"{warm_s:>9.2f}{cold_s:>9.2f}{ttft:>10.2f}{floor_s / ttft:>6.2f}")
    print("  (TFLOP/s warm per chunk; est. TTFT = GEMMs + attention only: norms, rotary, SiLU and the host not in it)")
    print("prefix part over 64K keys, folded q against native GQA (TFLOP/s):")
    for row in result["fold_sweep"]:
        print(f"  chunk {row['chunk']:>6}: fold {row['fold']['tflops']:5.0f}  gqa {row['gqa']['tflops']:5.0f}")
    for mode, errors in result["numerics"].items():
        worst = max(e["out_max_abs"] for e in errors.values())
        worst_lse = max(e["lse_max_abs"] for e in errors.values())
        print(f"numerics ({mode} plans) against float32: out max abs {worst:.4f}, lse max abs {worst_lse:.4f} "
              f"over {', '.join(errors)}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
