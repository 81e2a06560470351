"""A long prompt's chunk beside a step's decodes: in one Triton chunk launch with the decodes riding
along (splits counted per chunk: 15 decodes cut a 100K-token context from 17 splits to 7); through
`GpuBackend`, which folds them so (`gpu.FOLD_DECODE_MAX_KEYS`), and with the fold off, the decodes on
their own kernel; and the chunk alone. CUDA events, one layer's call; ms, and ms for 32 layers.
(Call102 also timed splits weighted by work; they made chat prompts' steps slower.)

    python benchmarks/launch_splits.py [--decodes 15] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch

from mnemosyne.attention import gpu
from mnemosyne.attention.backend import build_metadata
from mnemosyne.attention.triton_chunk import chunk_splits, paged_chunks, short_chunks
from mnemosyne.bench.floors import time_s

PAGE, HQ, HKV, D = 16, 32, 8, 128
DT = torch.bfloat16


def case(chunk: int, prefix: int, num_decodes: int, sms: int, repeats: int) -> tuple[str, ...]:
    requests, pages = [], 0
    for seq_len, num_new in [(2048 + 150 * i, 1) for i in range(num_decodes)] + [(prefix + chunk, chunk)]:
        used = -(-seq_len // PAGE)
        requests.append((seq_len, num_new, list(range(pages, pages + used))))
        pages += used
    k = torch.randn(pages * PAGE, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    meta = build_metadata(requests, PAGE, "cuda")
    q = torch.randn(meta.query_start_loc[-1], HQ, D, device="cuda", dtype=DT)
    mixed = short_chunks(meta, range(len(requests)))
    alone = short_chunks(meta, [len(requests) - 1])
    row = [f"{chunk}", f"{prefix // 1024}K"]
    for table in (mixed, alone):
        splits = chunk_splits(table, HQ, HKV, sms)
        ms = 1e3 * time_s(lambda t=table, s=splits: paged_chunks(q, k, v, meta.block_tables, t, PAGE, D ** -0.5, s),
                          repeats)
        row.append(f"{ms:.3f} ({splits}) / {32 * ms:.1f}")
    fold = gpu.FOLD_DECODE_MAX_KEYS
    for i, fold_max_keys in enumerate((fold, 0)):  # folded as serving runs it, then the decodes apart
        gpu.FOLD_DECODE_MAX_KEYS = fold_max_keys
        backend = gpu.GpuBackend(small_chunk_rows=8192)  # serving's split
        ms = 1e3 * time_s(lambda b=backend: b.forward(q, k, v, meta, D ** -0.5), repeats)
        row.insert(3 + i, f"{ms:.3f} / {32 * ms:.1f}")
    gpu.FOLD_DECODE_MAX_KEYS = fold
    return tuple(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; {args.decodes} decodes of 2-4K context ride along")
    print("chunk | prefix | decodes in the launch: ms (splits) / 32 layers | GpuBackend | GpuBackend, decodes"
          " apart | the chunk alone")
    for prefix in (16384, 32768, 65536, 131072):
        for chunk in (64, 128, 192, 256):
            print(" | ".join(case(chunk, prefix, args.decodes, sms, args.repeats)))


if __name__ == "__main__":
    main()
