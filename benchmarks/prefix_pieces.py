"""What a long prompt's chunk pays for cutting its prefix into power-of-two pieces (exact cuDNN plans,
`attention.gpu.run_pieces`), at the chunks and prefixes of a 1M-token prefill: one layer's chunk
attention, timed with CUDA events after its plans are built, four ways:

- `engine`: `chunk_attention` as the engine calls it (causal part, pieces, one merge of all parts);
- `kernels`: the same cuDNN calls without the merge;
- `merge`: the engine's merge alone (`merge_parts`, every part read once), on the parts `kernels`
  produced; `pairwise`: the merge before it, two parts at a time through a float32 running result;
- `whole`: one cuDNN call over the whole prefix (its own exact plan, built first), the causal part
  and one merge: what the pieces would cost if plans were free.

Each as TFLOP/s of the chunk's attention FLOPs (4 · chunk · (prefix + chunk/2) · heads · head_dim).

    python benchmarks/prefix_pieces.py [--chunks 1024,2048,4096] [--prefixes 262144,700416,1044480] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from benchmarks.prefill_anatomy import DT, HKV, HQ, SCALE, D, events_ms


def measure(chunk: int, prefix: int, k_cache: torch.Tensor, v_cache: torch.Tensor, repeats: int) -> dict:
    from mnemosyne.attention.gpu import _cudnn, chunk_attention, run_pieces
    from mnemosyne.attention.triton_merge import merge_parts

    gen = torch.Generator("cuda").manual_seed(chunk + prefix)
    q = torch.randn(chunk, HQ, D, device="cuda", dtype=DT, generator=gen)
    k_new, v_new = k_cache[prefix:prefix + chunk], v_cache[prefix:prefix + chunk]
    runs = ((0, prefix),)
    pieces = run_pieces(0, prefix)

    def parts(whole: bool):
        qh = q.transpose(0, 1).unsqueeze(0)
        kn, vn = (t.contiguous().transpose(0, 1).unsqueeze(0) for t in (k_new, v_new))
        out, lse = _cudnn(qh, kn, vn, SCALE, True)
        found = [(out[0].transpose(0, 1), lse[0].transpose(0, 1))]
        for start, end in ((0, prefix),) if whole else pieces:
            k = k_cache[start:end].permute(1, 0, 2).unsqueeze(0)
            v = v_cache[start:end].permute(1, 0, 2).unsqueeze(0)
            o, lse = _cudnn(qh, k, v, SCALE, False)
            found.append((o[0].transpose(0, 1), lse[0].transpose(0, 1)))
        return found

    def merge(found):
        return merge_parts([o for o, _ in found], [lse for _, lse in found], DT)

    def pairwise(found):
        out, lse = found[0]
        if len(found) > 2:
            out = out.float()
        for part_out, part_lse in found[1:]:
            out, lse = merge_parts([out, part_out], [lse, part_lse], out.dtype)
        return out.to(DT), lse

    engine = lambda: chunk_attention(q, k_new, v_new, k_cache, v_cache, runs, SCALE, split_runs=True)  # noqa: E731
    for fn in (engine, lambda: parts(True)):  # plans first
        fn()
    found = parts(False)
    variants = {"engine": engine, "kernels": lambda: parts(False), "merge": lambda: merge(found),
                "pairwise": lambda: pairwise(found), "whole": lambda: merge(parts(True))}
    times = {name: statistics.median(events_ms(fn, repeats)) for name, fn in variants.items()}
    flops = 4 * chunk * (prefix + chunk / 2) * HQ * D
    return {"chunk": chunk, "prefix": prefix, "num_pieces": len(pieces), "ms": times,
            "tflops": {k: flops / (v * 1e-3) / 1e12 for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", default="1024,2048,4096")
    p.add_argument("--prefixes", default="262144,700416,1044480")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-o", "--output")
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    prefixes = [int(c) for c in args.prefixes.split(",")]
    slots = max(prefixes) + max(chunks)
    gen = torch.Generator("cuda").manual_seed(0)
    k_cache = torch.randn(slots, HKV, D, device="cuda", dtype=DT, generator=gen)
    v_cache = torch.randn(slots, HKV, D, device="cuda", dtype=DT, generator=gen)
    rows = []
    print(f"{torch.cuda.get_device_name()}: one layer's chunk attention, ms (TFLOP/s)")
    print(f"{'chunk':>6} {'prefix':>8} {'pieces':>6} {'engine':>16} {'kernels':>16} {'merge':>8} {'pairwise':>8} {'whole':>16}")
    for prefix in prefixes:
        for chunk in chunks:
            r = measure(chunk, prefix, k_cache, v_cache, args.repeats)
            rows.append(r)
            ms, tf = r["ms"], r["tflops"]
            print(f"{chunk:>6} {prefix:>8} {r['num_pieces']:>6} {ms['engine']:>8.3f} ({tf['engine']:>4.0f}) "
                  f"{ms['kernels']:>8.3f} ({tf['kernels']:>4.0f}) {ms['merge']:>8.3f} {ms['pairwise']:>8.3f} "
                  f"{ms['whole']:>8.3f} ({tf['whole']:>4.0f})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
