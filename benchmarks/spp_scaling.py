"""SPP scaling on GPUs: TTFT of one long prompt at pp = 1, 2, 4 with sequence pipelining on and
off, and the decode TBT that follows it at that context. Reports TTFT scaling efficiency
(TTFT at pp=1 / (pp × TTFT at pp)) and TBT relative to pp=1. Every run is a fresh engine; rows are
appended to the JSON as they finish, so one long sweep can be split over several invocations.

    python benchmarks/spp_scaling.py --pp 1,2,4 --prompt-len 262144 -o out/spp_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

from benchmarks.layout_check import drain, release_gpu

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


def _prompt(vocab: int, n: int) -> list[int]:
    return [3 + (i * 7919) % (vocab - 3) for i in range(n)]


def measure(config: EngineConfig, prompt_len: int, decode_steps: int) -> dict[str, float]:
    """TTFT of one prompt of prompt_len tokens, then the median gap of decode_steps more tokens."""
    engine = LLMEngine(config)
    try:
        vocab = engine.model_config.vocab_size
        warm_up = engine.add_request(_prompt(vocab, min(4096, prompt_len)), SamplingParams(max_tokens=4, ignore_eos=True))
        drain(engine, warm_up)
        request_id = engine.add_request(_prompt(vocab, prompt_len),
                                        SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True))
        metrics = drain(engine, request_id).metrics
        gaps = metrics.inter_token_s
        return {"ttft_s": metrics.ttft_s, "tbt_s": statistics.median(gaps) if gaps else float("nan")}
    finally:
        engine.shutdown()
        del engine
        release_gpu()


def summarise(rows: list[dict]) -> str:
    base = next((r for r in rows if r["pp"] == 1), None)
    lines = [f"{'pp':>3} {'SPP':>4} {'TTFT s':>9} {'scaling':>8} {'TBT ms':>8} {'TBT / pp1':>9}"]
    for r in rows:
        scaling = base["ttft_s"] / (r["pp"] * r["ttft_s"]) if base else float("nan")
        tbt_ratio = r["tbt_s"] / base["tbt_s"] if base else float("nan")
        lines.append(f"{r['pp']:>3} {'on' if r['spp'] else 'off':>4} {r['ttft_s']:>9.2f} {scaling:>8.1%} "
                     f"{r['tbt_s'] * 1e3:>8.2f} {tbt_ratio:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--pp", default="1,2,4", help="pipeline sizes, comma-separated")
    parser.add_argument("--modes", default="on,off", help="sequence pipelining on, off or both (pp=1: one run)")
    parser.add_argument("--prompt-len", type=int, default=262144)
    parser.add_argument("--chunk", type=int, default=4096,
                        help="tokens per step: a prompt of n chunks fills pp stages with a bubble of ~(pp-1)/n")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trace-file", help="Chrome trace of the runs (every stage syncs and reports, so "
                        "time a traced run apart from the untraced ones; use it for one pp and mode)")
    parser.add_argument("-o", "--output", type=Path, default=Path("spp_scaling.json"))
    args = parser.parse_args()
    rows = json.loads(args.output.read_text()) if args.output.exists() else []
    for pp in (int(p) for p in args.pp.split(",")):
        for mode in args.modes.split(",") if pp > 1 else ["on"]:
            config = EngineConfig(
                model=args.model, pipeline_parallel_size=pp, sequence_pipelining=mode == "on",
                max_model_len=args.prompt_len + args.decode_steps + 8, max_num_batched_tokens=args.chunk,
                chunking=f"fixed:{args.chunk}", scheduler="fcfs", max_num_seqs=8, device=args.device,
                trace_file=args.trace_file)
            row = {"pp": pp, "spp": mode == "on", "prompt_len": args.prompt_len, "chunk": args.chunk,
                   "traced": args.trace_file is not None,
                   **measure(config, args.prompt_len, args.decode_steps)}
            rows = [r for r in rows if (r["pp"], r["spp"], r["prompt_len"], r.get("traced", False))
                    != (pp, row["spp"], args.prompt_len, row["traced"])]
            rows.append(row)
            rows.sort(key=lambda r: (r["pp"], not r["spp"]))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(rows, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()
