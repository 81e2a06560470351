"""One long prompt end to end on a parallel layout: exactness on a shortened prompt, then the TTFT of
the full prompt against the FLOP floor of all the layout's GPUs, the decode TBT that follows at that
context against its bandwidth floor, and the memory each GPU used while it ran. Ceilings (matmul
rate, copy bandwidth) are measured first, in the same run.

    python benchmarks/layout_check.py --model dummy:llama-3.1-8b --prompt-len 65536 --decode-steps 0 -o out/ref64k.json
    python benchmarks/long_context.py --pp 4 --reference out/ref64k.json -o out/long_pp4.json

Every KV byte here is computed by a real prefill: nothing is filled with random values.

Decode floor: a decode token passes the pipeline stages one after another, so a step must read all
the weights (over tp) and the largest KV shard (over kvp and tp) at one GPU's copy bandwidth.
Memory: NVML samples each GPU's used memory every 50 ms; what is left after the worker's weights and
KV cache (both reported by the worker itself) and the memory in use before the engine started is
activations, CUDA/NCCL context, CUDA graphs and allocator slack, reported against the device's size.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

import torch
from benchmarks.layout_check import (
    describe_match,
    drain,
    greedy_tokens,
    match_with_ties,
    release_gpu,
    seeded_prompt,
)
from benchmarks.nvml import Poller, visible_handles
from tqdm import tqdm

from mnemosyne.bench.floors import decode_bytes, measure_ceilings, prefill_flops
from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


class MemorySampler(Poller):
    """Peak used memory of each visible GPU, sampled from construction until `stop()`."""

    def __init__(self, period_s: float = 0.05):
        super().__init__(period_s)
        self._nvml, self.handles = visible_handles()
        self.total = [self._nvml.nvmlDeviceGetMemoryInfo(h).total for h in self.handles]
        self.peak = self.used()
        self.start()

    def used(self) -> list[int]:
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]

    def reset(self) -> None:
        self.peak = self.used()

    def sample(self) -> None:
        self.peak = [max(p, u) for p, u in zip(self.peak, self.used(), strict=True)]


def memory_report(infos: dict, baseline: list[int], peak: list[int], total: list[int]) -> list[dict[str, Any]]:
    """Per worker GPU: weights, KV cache, and everything else at the peak, in GiB and as shares."""
    rows = []
    for rank, info in infos.items():
        gpu = int(info.device.split(":")[1]) if ":" in info.device else 0
        other = peak[gpu] - baseline[gpu] - info.weight_bytes - info.kv_cache_bytes
        left_for_kv = total[gpu] - baseline[gpu] - info.weight_bytes - other
        rows.append({"rank": rank, "gpu": gpu, "weights_gib": info.weight_bytes / 2**30,
                     "kv_cache_gib": info.kv_cache_bytes / 2**30, "other_peak_gib": other / 2**30,
                     "other_share_of_device": other / total[gpu],
                     "kv_share_of_memory_after_weights_and_other": info.kv_cache_bytes / left_for_kv})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--kvp", type=int, default=1)
    p.add_argument("--kvp-group-max-tokens", type=int, default=None,
                   help="default: the context split evenly over the KVP groups")
    p.add_argument("--context", type=int, default=1 << 20, help="prompt tokens (0: the exactness check only)")
    p.add_argument("--chunk", type=int, default=16384, help="--max-num-batched-tokens")
    p.add_argument("--chunking", default="adaptive", help="adaptive (no SLO pressure: the largest chunk) or fixed:N")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--check-len", type=int, default=65536, help="shortened prompt compared with --reference (0: none)")
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--reference", type=Path, help="layout_check.py JSON of tp=pp=kvp=1 on the shortened prompt")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (no floors, no memory)")
    p.add_argument("--pipeline-depth", type=int, help="the engine's --pipeline-depth (default: pp)")
    p.add_argument("--trace-file", help="the engine's --trace-file: each stage's micro-batches, timed (each stage "
                                        "then waits for its kernels after every micro-batch, which costs some TTFT)")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args()

    on_gpu = args.device == "cuda"
    ceilings = measure_ceilings(torch.device("cuda")) if on_gpu else None  # before the workers take the memory
    release_gpu()
    sampler = MemorySampler() if on_gpu else None
    baseline = sampler.used() if sampler else []
    world = args.tp * args.pp * args.kvp
    block = 16
    group = args.kvp_group_max_tokens
    if group is None and args.kvp > 1:
        longest = max(args.context, args.check_len) + args.decode_steps + 64
        group = -(-longest // args.kvp // block) * block
    engine = LLMEngine(EngineConfig(
        model=args.model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, kv_parallel_size=args.kvp,
        kvp_group_max_tokens=group, max_model_len=max(args.context, args.check_len) + args.decode_steps + 64,
        dtype="bfloat16" if on_gpu else "float32", device=args.device, max_num_seqs=4,
        kv_cache_memory=None if on_gpu else 0.05, max_num_batched_tokens=args.chunk, chunking=args.chunking,
        trace_file=args.trace_file, pipeline_depth=args.pipeline_depth))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "model": args.model, "tp": args.tp, "pp": args.pp, "kvp": args.kvp,
        "gpus": world, "context": args.context, "chunk": args.chunk, "chunking": args.chunking,
        "pipeline_depth": engine.config.max_micro_batches,
        "kvp_group_max_tokens": group}
    try:
        cfg = engine.model_config
        vocab = cfg.vocab_size
        if args.check_len:
            check_prompt = seeded_prompt(vocab, args.check_len)
            result["check"] = {"prompt_len": args.check_len}
            if args.reference:
                ref = json.loads(args.reference.read_text())
                ref = {"tokens": ref["tokens"][:args.check_tokens], "top2": ref["top2"][:args.check_tokens]}
                match = match_with_ties(ref, lambda forced, n: greedy_tokens(engine, check_prompt + forced, n))
                result["check"].update(match, reference_tokens=ref["tokens"])
            else:
                result["check"]["tokens"] = greedy_tokens(engine, check_prompt, args.check_tokens)["tokens"]
            print(f"check: {args.check_len}-token prompt -> {result['check']['tokens']}", flush=True)

        if args.context:  # 0: the exactness check alone
            prompt = seeded_prompt(vocab, args.context, seed=2)
            if sampler:
                sampler.reset()
            params = SamplingParams(max_tokens=args.decode_steps + 2, ignore_eos=True)
            request_id = engine.add_request(prompt, params)
            request = engine.scheduler.requests[request_id]
            with tqdm(total=args.context, desc="prefill", unit="tok", unit_scale=True, mininterval=10) as bar:
                while not request.num_output_tokens:
                    engine.step()
                    bar.update(min(request.num_computed_tokens, args.context) - bar.n)
            prefill_peak = list(sampler.peak) if sampler else []
            out = drain(engine, request_id)
            gaps = out.metrics.inter_token_s[1:]  # the first gap includes the decode warm-up
            result["ttft_s"] = out.metrics.ttft_s
            result["tbt_ms"] = sorted(gaps)[len(gaps) // 2] * 1e3
            result["tbt_max_ms"] = max(gaps) * 1e3
            infos = engine.executor.worker_infos
    finally:
        engine.shutdown()
        if sampler:
            sampler.stop()
    check = result.get("check", {})
    print(f"{result['device']} × {world}: {args.model}, tp={args.tp} pp={args.pp} kvp={args.kvp}, "
          f"{args.context}-token prompt, chunk {args.chunk} ({args.chunking})")
    if "equal_prefix" in check:
        print(f"  exactness against tp=pp=kvp=1 on a {check['prompt_len']}-token prompt: {describe_match(check)}")
    if not args.context:
        return _finish(result, args)
    print(f"  TTFT {result['ttft_s']:.1f} s; decode TBT {result['tbt_ms']:.2f} ms (max {result['tbt_max_ms']:.2f})")
    if ceilings and sampler:
        _floors_and_memory(result, args, cfg, ceilings, group, infos, baseline, prefill_peak, sampler.total)
    _finish(result, args)


def _finish(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


def _floors_and_memory(result, args, cfg, ceilings, group, infos, baseline, peak, total) -> None:
    world = result["gpus"]
    result.update(matmul_tflop_per_s=ceilings.matmul_flops_per_s / 1e12, copy_tb_per_s=ceilings.copy_bytes_per_s / 1e12)
    floor_s = prefill_flops(cfg, args.context) / (ceilings.matmul_flops_per_s * world)
    shard = min(args.context, group or args.context)
    decode_floor_s = decode_bytes(cfg, 1, shard) / args.tp / ceilings.copy_bytes_per_s
    memory = memory_report(infos, baseline, peak, total)
    result.update(prefill_floor_s=floor_s, mfu=floor_s / result["ttft_s"], decode_floor_ms=decode_floor_s * 1e3,
                  mbu=decode_floor_s * 1e3 / result["tbt_ms"], memory=memory,
                  other_peak_share_max=max(m["other_share_of_device"] for m in memory),
                  kv_share_min=min(m["kv_share_of_memory_after_weights_and_other"] for m in memory))
    print(f"  FLOP floor over {world} GPUs {floor_s:.1f} s "
          f"(matmul {result['matmul_tflop_per_s']:.0f} TFLOP/s measured); MFU {result['mfu']:.2f}")
    print(f"  decode floor {decode_floor_s * 1e3:.2f} ms "
          f"(weights/tp + a {shard}-token KV shard at {result['copy_tb_per_s']:.2f} TB/s); MBU {result['mbu']:.2f}")
    print(f"  memory at the prefill peak, worst GPU: besides weights and KV {result['other_peak_share_max']:.1%} of "
          f"the device; KV cache {result['kv_share_min']:.1%} of what weights and the rest leave")


if __name__ == "__main__":
    main()
