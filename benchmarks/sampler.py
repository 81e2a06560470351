"""Time of `layers/sampler.sample` for batches of seeded rows over a 128K vocabulary (Llama 3's), with
temperature only, top-p, and top-k plus top-p. On a GPU the count of kernel launches is what
matters; on the CPU, the work itself.

    python benchmarks/sampler.py [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from mnemosyne.layers.sampler import SamplingBatch, make_generator, sample

VOCAB = 128256
CASES = [(8, -1, 1.0), (8, -1, 0.9), (64, 50, 0.9), (64, -1, 1.0)]
"""(rows, top_k, top_p), all at temperature 0.8."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"sample() over a {VOCAB}-token vocabulary on {args.device}, temperature 0.8")
    for rows, top_k, top_p in CASES:
        logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows), device="cpu").to(device) * 3
        batch = SamplingBatch(temperatures=(0.8,) * rows, top_ks=(top_k,) * rows, top_ps=(top_p,) * rows,
                              min_ps=(0.0,) * rows, num_logprobs=(None,) * rows,
                              generators=tuple(make_generator(i, device) for i in range(rows)))
        sample(logits, batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            sample(logits, batch).token_ids.tolist()
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        print(f"  {rows:3d} rows, top_k {top_k:3d}, top_p {top_p:.1f}: {ms:7.2f} ms")


if __name__ == "__main__":
    main()
