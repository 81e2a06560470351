"""Where a step's GPU time goes: one chunked prefill and a few decode steps of dummy:llama-3-8b
under torch.profiler, printed as the top CUDA kernels by total time.

    python benchmarks/profile_step.py [--prefill 32768] [--decode-context 131072]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefill", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("MNEMOSYNE_QUIET", "1")
    engine = LLMEngine(EngineConfig(model="dummy:llama-3-8b", max_model_len=args.prefill + 64,
                                    max_num_batched_tokens=args.chunk, max_num_seqs=8))
    prompt = torch.randint(3, 128000, (args.prefill,)).tolist()
    engine.add_request(prompt[:1024], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request(prompt, SamplingParams(max_tokens=args.decode_steps + 1, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_prof:
        while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
            engine.step()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as decode_prof:
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
    for name, prof in (("prefill", prefill_prof), (f"{args.decode_steps} decode steps", decode_prof)):
        print(f"== {name} of {args.prefill} tokens")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
