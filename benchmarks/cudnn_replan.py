"""What a new sequence length costs the cuDNN attention path: PyTorch keys its cuDNN plans on exact
shapes, so every chunk over a prefix of a length not seen before builds plans first. A long prefill
in chunks meets a new prefix length at every step. Times `attention/gpu.py`'s `chunk_attention`
(Llama-3-8B heads, bf16) over a run of fresh prefix lengths, first call (cold) against repeats
(warm), with PyTorch's default plan cache and with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (its ragged
path, which keys plans on lengths rounded up to powers of two), each in its own process since
PyTorch reads the variable once. Both are checked against a float32 reference.

    python benchmarks/cudnn_replan.py [--chunks 512,2048] [--prefix 65536] [--lengths 8]

With --sweep, each process instead times the first call at every (chunk, prefix) of a grid that
crosses the powers of two, in order: what a serving engine pays the first time its chunks and
prefixes reach a new size class, which a median over lengths within one class hides.

    python benchmarks/cudnn_replan.py --sweep [--chunks 2304,4096,8192,16384] [--prefixes 3000,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HQ, HKV, D = 32, 8, 128


def measure(chunks: list[int], prefix: int, num_lengths: int) -> list[dict]:
    from mnemosyne.attention.gpu import chunk_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = prefix + num_lengths * 4096 + max(chunks)
    k_cache = torch.randn(slots, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(slots, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []
    for chunk in chunks:
        q = torch.randn(chunk, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_new = torch.randn(chunk, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v_new = torch.randn_like(k_new)
        cold, warm, error = [], [], 0.0
        for i in range(num_lengths):
            length = prefix + i * 4096 + 16 * (i % 3)  # a fresh length each time, as a chunked prefill meets
            runs = ((0, length),)
            for times in (cold, warm, warm, warm):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out, _ = chunk_attention(q, k_new, v_new, k_cache, v_cache, runs, D ** -0.5)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            if i == 0:
                error = max(error, _error(out, q, k_new, v_new, k_cache[:length], v_cache[:length]))
        rows.append({"chunk": chunk, "prefix": prefix, "lengths": num_lengths,
                     "cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3,
                     "max_error": error})
    return rows


def sweep(chunks: list[int], prefixes: list[int]) -> list[dict]:
    """ms of the first call at each (chunk, prefix), prefixes ascending within each chunk length."""
    from mnemosyne.attention.gpu import chunk_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = max(prefixes) + max(chunks)
    k_cache = torch.randn(slots, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for chunk in chunks:
        q = torch.randn(chunk, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_new = torch.randn(chunk, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v_new = torch.randn_like(k_new)
        for prefix in prefixes:
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                chunk_attention(q, k_new, v_new, k_cache, v_cache, ((0, prefix),), D ** -0.5)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            rows.append({"chunk": chunk, "prefix": prefix, "first_ms": times[0] * 1e3, "again_ms": times[1] * 1e3})
    return rows


def _error(out: torch.Tensor, q, k_new, v_new, k_prefix, v_prefix) -> float:
    """Largest |out - reference| over the chunk's first 64 queries, the reference in float32."""
    group = HQ // HKV
    k = torch.cat([k_prefix, k_new]).float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = torch.cat([v_prefix, v_new]).float().repeat_interleave(group, dim=1).transpose(0, 1)
    n = min(64, q.shape[0])
    positions = torch.arange(k_prefix.shape[0], k_prefix.shape[0] + n, device=q.device)
    mask = torch.arange(k.shape[1], device=q.device)[None, :] <= positions[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q[:n].float().transpose(0, 1), k, v, attn_mask=mask,
                                                           scale=D ** -0.5)
    return (out[:n].float() - ref.transpose(0, 1)).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", default="512,2048", help="chunk lengths, comma-separated")
    p.add_argument("--prefix", type=int, default=65536, help="the first prefix length")
    p.add_argument("--lengths", type=int, default=8, help="fresh prefix lengths per chunk length")
    p.add_argument("--sweep", action="store_true", help="first-call times over a grid crossing powers of two")
    p.add_argument("--prefixes", default="3000,5000,9000,12000,17000,33000,40000,66000,130000,140000",
                   help="--sweep: prefix lengths, comma-separated")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output")
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    prefixes = [int(n) for n in args.prefixes.split(",")]
    if args.child:
        rows = sweep(chunks, prefixes) if args.sweep else measure(chunks, args.prefix, args.lengths)
        print(json.dumps(rows))
        return
    results = {}
    for mode, value in (("default", None), ("avoid_recompile", "1")):
        env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"}
        if value is not None:
            env["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = value
        done = subprocess.run([sys.executable, __file__, "--child", "--chunks", args.chunks, "--prefix",
                               str(args.prefix), "--lengths", str(args.lengths), "--prefixes", args.prefixes]
                              + (["--sweep"] if args.sweep else []),
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-3000:]}")
            continue
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.sweep:
        print(f"{torch.cuda.get_device_name()}: the first chunk_attention call at each (chunk, prefix), in order")
        print(f"{'mode':16} {'chunk':>6} {'prefix':>8} {'first ms':>9} {'again ms':>9}")
        for mode, rows in results.items():
            for r in rows:
                print(f"{mode:16} {r['chunk']:6d} {r['prefix']:8d} {r['first_ms']:9.2f} {r['again_ms']:9.2f}")
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)
        return
    print(f"{torch.cuda.get_device_name()}: chunk_attention over fresh prefix lengths (cold: the first call "
          "at a length; warm: repeats)")
    print(f"{'mode':16} {'chunk':>6} {'prefix':>8} {'cold ms':>9} {'warm ms':>9} {'max |err|':>10}")
    for mode, rows in results.items():
        for r in rows:
            print(f"{mode:16} {r['chunk']:6d} {r['prefix']:8d} {r['cold_ms']:9.2f} {r['warm_ms']:9.2f} "
                  f"{r['max_error']:10.2e}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
