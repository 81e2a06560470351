"""Record a pipeline trace on the CPU: one long prompt, prefilled in chunks over `pp` stages, next
to two short requests that decode meanwhile. Prints the long prompt's TTFT.

    python benchmarks/spp_trace.py -o docs/spp_trace.json
    python benchmarks/spp_trace.py --no-sequence-pipelining -o docs/spp_trace_off.json
    python benchmarks/plot_trace.py docs/spp_trace.json docs/spp_trace_off.json -o docs/spp_trace.png
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

from mnemosyne import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:smollm2-135m")
    parser.add_argument("-pp", "--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64, help="tokens per step (fixed chunking)")
    parser.add_argument("--sequence-pipelining", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("-o", "--output", required=True, help="trace JSON to write")
    args = parser.parse_args()
    llm = LLM(args.model, pipeline_parallel_size=args.pipeline_parallel_size, device="cpu", kv_cache_memory=0.25,
              max_num_batched_tokens=args.chunk, chunking=f"fixed:{args.chunk}", scheduler="fcfs",
              sequence_pipelining=args.sequence_pipelining, trace_file=args.output)
    # Two short requests first, so their decodes ride along with the long prompt's chunks.
    prompts = [[5, 6, 7, 8], [9, 10, 11], [3 + i % 1000 for i in range(args.prompt_len)]]
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * 2 + [SamplingParams(max_tokens=2, ignore_eos=True)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.shutdown()
    ttft_s = outputs[-1].metrics.ttft_s
    mode = "on" if args.sequence_pipelining else "off"
    print(f"pp={args.pipeline_parallel_size}, sequence pipelining {mode}: TTFT of the {args.prompt_len}-token "
          f"prompt {ttft_s * 1e3:.0f} ms; trace in {args.output}")


if __name__ == "__main__":
    main()
