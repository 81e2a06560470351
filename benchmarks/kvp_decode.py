"""Decode TBT (and optionally prefill TTFT) of one long request under KV-cache parallelism, against
the decode bandwidth floor of one GPU's share, with the device's ceilings measured in the same run.

By default the prompt's KV is NOT computed: every worker fills its KV cache with seeded random
values at start-up (MNEMOSYNE_RANDOM_KV_SEED) and the request is admitted as if its prompt had been
prefilled, so a 1M- or 2M-token decode is timed in seconds instead of after a multi-minute prefill.
The attention kernels read every cached key whatever its value, so the step time is the same; the
tokens are not meaningful. --prefill runs the real prefill instead (and reports its TTFT).

    python benchmarks/kvp_decode.py --kvp 4 --context 1048576          # decode at 1M over 4 groups
    python benchmarks/kvp_decode.py --kvp 4 --context 1048576 --prefill --decode-steps 8
    python benchmarks/kvp_decode.py --kvp 4 --context max     # the longest context the KV caches hold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mnemosyne.bench.floors import Ceilings, decode_bytes, measure_ceilings, prefill_flops
from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.request import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--kvp", type=int, default=4, help="KV-parallel groups (one GPU each at tp=1)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--context", type=_context, default=1 << 20,
                   help="prompt tokens, or 'max': the most that the groups' KV caches hold")
    p.add_argument("--group-max-tokens", type=int, default=None,
                   help="--kvp-group-max-tokens; default: the context split evenly over the groups")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed (median reported)")
    p.add_argument("--prefill", action="store_true", help="compute the prompt's KV instead of random values")
    p.add_argument("--chunk", type=int, default=16384, help="--max-num-batched-tokens for --prefill")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (no floors)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB of KV cache per worker (default: what the GPU has free; 0.05 on the CPU)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan each decode step while the previous one runs (the engine's default)")
    p.add_argument("-o", "--output", default=None, help="write the result as JSON here")
    args = p.parse_args()

    block = 16
    if args.context is None:  # sized from the caches once the workers have them
        total, group = 1 << 26, args.group_max_tokens
    else:
        total = args.context + args.decode_steps + 4
        per_group = -(-total // args.kvp)
        group = args.group_max_tokens or -(-per_group // block) * block
    on_gpu = args.device == "cuda"
    ceilings = measure_ceilings(torch.device("cuda")) if on_gpu else None  # before the workers take the memory
    if on_gpu:
        torch.cuda.empty_cache()
    if not args.prefill:
        os.environ["MNEMOSYNE_RANDOM_KV_SEED"] = "0"  # the workers inherit it
    from mnemosyne.engine.llm_engine import LLMEngine

    config = EngineConfig(model=args.model, kv_parallel_size=args.kvp, tensor_parallel_size=args.tp,
                          kvp_group_max_tokens=group, max_model_len=total + block,
                          dtype="bfloat16" if on_gpu else "float32", device=args.device, max_num_seqs=4,
                          max_num_batched_tokens=args.chunk, chunking=f"fixed:{args.chunk}",
                          kv_cache_memory=args.kv_cache_memory or (None if on_gpu else 0.05),
                          async_scheduling=args.async_scheduling)
    engine = LLMEngine(config)
    cfg = engine.model_config
    if args.context is None:
        placement = engine.scheduler.pool
        group = placement.group_max_tokens
        args.context = placement.max_request_tokens - args.decode_steps - 4 - block
        per_group = group
    prompt = torch.randint(3, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=args.decode_steps + 3, ignore_eos=True))
    if not args.prefill:  # the prompt's KV is "there" already: only its last token is computed
        engine.scheduler.requests[request_id].num_computed_tokens = args.context - 1
    start = time.perf_counter()
    while not engine.scheduler.requests[request_id].num_output_tokens:
        engine.step()
    ttft_s = time.perf_counter() - start
    engine.step()  # warm-up decode
    gaps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        gaps.append(time.perf_counter() - start)
    engine.shutdown()

    tbt_s = statistics.median(gaps)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "model": args.model, "kvp": args.kvp,
        "tp": args.tp, "context": args.context, "kvp_group_max_tokens": group, "random_kv": not args.prefill,
        "tbt_ms": tbt_s * 1e3, "tbt_min_ms": min(gaps) * 1e3, "tbt_max_ms": max(gaps) * 1e3,
        "decode_steps": len(gaps), "ttft_s": ttft_s, "async_scheduling": args.async_scheduling,
    }
    print(f"{result['device']}: {args.model}, kvp={args.kvp} tp={args.tp}, context {args.context} "
          f"(L = {group}, {'random KV, no prefill' if not args.prefill else 'real prefill'}, "
          f"{'async' if args.async_scheduling else 'synchronous'} scheduling)")
    print(f"  decode TBT {result['tbt_ms']:.2f} ms (min {result['tbt_min_ms']:.2f}, max {result['tbt_max_ms']:.2f})"
          + ("" if args.prefill else f"; first step (admission, prompt and block ids sent once) {ttft_s:.2f} s"))
    if ceilings is not None:
        _floors(result, args, cfg, ceilings, per_group)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


def _context(text: str) -> int | None:
    return None if text == "max" else int(text)


def _floors(result: dict, args: argparse.Namespace, cfg: ModelConfig, ceilings: Ceilings, shard: int) -> None:
    """Add the decode bandwidth floor of one GPU's share (and, with --prefill, the FLOP floor) to result."""
    floor_s = decode_bytes(cfg, 1, shard) / args.tp / ceilings.copy_bytes_per_s
    result.update(copy_tb_per_s=ceilings.copy_bytes_per_s / 1e12,
                  matmul_tflop_per_s=ceilings.matmul_flops_per_s / 1e12,
                  decode_floor_ms=floor_s * 1e3, mbu=floor_s * 1e3 / result["tbt_ms"])
    print(f"  decode floor {result['decode_floor_ms']:.2f} ms (weights + a {shard}-token KV shard per GPU at "
          f"{result['copy_tb_per_s']:.2f} TB/s measured); MBU {result['mbu']:.2f}")
    if args.prefill:
        ttft_s = result["ttft_s"]
        floor_1gpu_s = prefill_flops(cfg, args.context) / ceilings.matmul_flops_per_s
        result.update(prefill_floor_1gpu_s=floor_1gpu_s, mfu_1gpu=floor_1gpu_s / ttft_s,
                      mfu_all_gpus=floor_1gpu_s / ttft_s / (args.kvp * args.tp))
        print(f"  TTFT {ttft_s:.1f} s; one-GPU FLOP floor {floor_1gpu_s:.1f} s (MFU vs one GPU "
              f"{result['mfu_1gpu']:.2f}, vs all {args.kvp * args.tp} GPUs {result['mfu_all_gpus']:.2f})")


if __name__ == "__main__":
    main()
