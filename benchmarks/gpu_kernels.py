"""Attention kernels on the GPU at Llama-3-8B head shapes (32 q heads, 8 kv heads, d=128, bf16),
against the ceilings DEVICE.md lists: decode KV-read bandwidth of the Triton paged kernel, and
TFLOP/s of a prefill chunk over a long prefix through the cuDNN path (prefix + causal + merge).

    python benchmarks/gpu_kernels.py
"""

from __future__ import annotations

import torch

from mnemosyne.attention.backend import build_metadata
from mnemosyne.attention.gpu import chunk_attention
from mnemosyne.attention.triton_decode import num_splits_for, paged_decode
from mnemosyne.bench.floors import measure_ceilings, time_s

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


def time_ms(fn, repeats: int = 20) -> float:
    return time_s(fn, repeats) * 1e3


def decode_case(batch: int, context: int, sms: int, programs_per_sm: int = 4) -> tuple[float, float]:
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
    k = torch.randn(prefix + chunk, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    q = torch.randn(chunk, HQ, D, device="cuda", dtype=DT)
    runs = ((0, prefix),)
    ms = time_ms(lambda: chunk_attention(q, k[prefix:], v[prefix:], k, v, runs, D ** -0.5), 10)
    flops = 4 * chunk * (prefix + chunk / 2) * HQ * D
    return ms, flops / ms / 1e9


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceilings = measure_ceilings(torch.device("cuda"))
    bw = ceilings.copy_bytes_per_s / 1e12
    print(f"{torch.cuda.get_device_name(0)}: copy {bw:.2f} TB/s (read+write), "
          f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s, {sms} SMs")
    print("decode (Triton paged, KV read only)")
    for batch, context in ((1, 131072), (1, 1 << 20), (64, 4096), (8, 32768)):
        ms, tbps = decode_case(batch, context, sms)
        print(f"  B={batch:<3} context={context:<8} {ms:7.3f} ms  {tbps:5.2f} TB/s  {tbps / bw:5.1%} of copy")
    print("decode splits sweep, B=1 context=131072 (programs per SM)")
    for per_sm in (1, 2, 4, 8, 16):
        ms, tbps = decode_case(1, 131072, sms, per_sm)
        print(f"  {per_sm:>2} per SM  {ms:7.3f} ms  {tbps:5.2f} TB/s  {tbps / bw:5.1%} of copy")
    print("prefill chunk over a prefix (cuDNN, prefix + causal + merge)")
    for chunk, prefix in ((8192, 262144), (1024, 262144), (256, 1 << 20)):
        ms, tflops = chunk_case(chunk, prefix)
        print(f"  chunk={chunk:<5} prefix={prefix:<8} {ms:8.2f} ms  {tflops:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
