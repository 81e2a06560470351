"""The steps around a long prompt's arrival in a serving engine, one by one: serving runs saw a step of
155 ms against a prediction of 29 ms as the first long prompt began (call54, two of four one-GPU
runs). This replays that moment in one process: chat requests decoding, then a long prompt arrives;
each step's wall time and tokens are printed for the steps after it, and for the same moment with a
second long prompt (nothing is first any more); each long prompt is aborted after those steps.

    python benchmarks/first_long_step.py [--prewarm]        (one GPU; the serving engine's flags)
    python benchmarks/first_long_step.py --model dummy:tiny --device cpu --long-tokens 4000   (smoke test)

--prewarm first runs one prompt of the token cap to completion, before the chat requests: whatever
a first long chunk costs once per process (kernels loaded, memory claimed) is then paid there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--profile", default="benchmarks/profiles/h200-llama-3-8b-serving.json")
    p.add_argument("--long-tokens", type=int, default=162498)
    p.add_argument("--chat", type=int, default=12, help="chat requests decoding when the long prompt arrives")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prewarm", action="store_true")
    p.add_argument("-o", "--output")
    args = p.parse_args()

    config = EngineConfig(model=args.model, device=args.device, max_model_len=200000, tbt_slo_ms=50, ttft_slo_ms=2000,
                          latency_profile=args.profile if Path(args.profile).exists() else None,
                          max_num_batched_tokens=16384)
    started = time.perf_counter()
    engine = LLMEngine(config)
    print(f"engine up in {time.perf_counter() - started:.1f} s; CUDA_MODULE_LOADING="
          f"{os.environ.get('CUDA_MODULE_LOADING', '(default)')}, prewarm {args.prewarm}")
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    if args.prewarm:
        engine.add_request(prompt(config.max_num_batched_tokens), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    rows = []

    def run(label: str, num_steps: int) -> None:
        for _ in range(num_steps):
            t = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t
            plan = engine.last_plan
            chunks = sorted(((c.num_new_tokens, c.request_id) for c in plan.chunks), reverse=True) if plan else []
            rows.append({"phase": label, "wall_ms": round(wall * 1e3, 1),
                         "tokens": plan.num_tokens if plan else 0, "requests": len(chunks),
                         "largest": chunks[:2]})

    for long_index in range(2):
        for _ in range(args.chat):
            engine.add_request(prompt(rng.randrange(128, 2048)), SamplingParams(max_tokens=400, ignore_eos=True))
        run(f"chat {long_index}", 30)
        t = time.perf_counter()
        long_id = engine.add_request(prompt(args.long_tokens), SamplingParams(max_tokens=1, ignore_eos=True))
        print(f"long prompt {long_index}: add_request {1e3 * (time.perf_counter() - t):.1f} ms")
        run(f"long {long_index}", 12)
        engine.abort_request([long_id])
        while engine.has_unfinished_requests():
            engine.step()
    print(f"{'phase':8} {'wall ms':>8} {'tokens':>7} {'reqs':>5}  largest chunks")
    for i, r in enumerate(rows):
        last_chat = i + 3 < len(rows) and rows[i + 3]["phase"].startswith("long")  # the steady state just before
        if r["phase"].startswith("long") or last_chat:
            print(f"{r['phase']:8} {r['wall_ms']:8.1f} {r['tokens']:7d} {r['requests']:5d}  {r['largest']}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    engine.shutdown()


if __name__ == "__main__":
    main()
