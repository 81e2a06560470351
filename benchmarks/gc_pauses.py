"""Garbage-collection pauses in an engine stepping chat traffic in-process (dummy:tiny on the CPU): each
collection's generation and duration over a fixed time, with the start-up heap in the collector's reach,
or frozen out of it as every serving process now does (`mnemosyne.heap`).

    python benchmarks/gc_pauses.py [--freeze] [--seconds 40]
"""

from __future__ import annotations

import argparse
import gc
import random
import time

from mnemosyne.engine.llm import LLM
from mnemosyne.heap import freeze_startup_heap
from mnemosyne.request import SamplingParams

RUNNING = 48
"""Requests kept in the engine: a new chat whenever fewer run."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--freeze", action="store_true", help="freeze the start-up heap first")
    p.add_argument("--seconds", type=float, default=40.0)
    args = p.parse_args()
    engine = LLM("dummy:tiny", device="cpu", kv_cache_memory=0.5).engine
    if args.freeze:
        freeze_startup_heap()
    pauses: dict[int, list[float]] = {}
    started: list[float] = []

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses.setdefault(info["generation"], []).append((time.perf_counter() - started.pop()) * 1e3)

    rng = random.Random(0)
    gc.callbacks.append(on_collection)
    num_requests = num_steps = 0
    end_s = time.perf_counter() + args.seconds
    while time.perf_counter() < end_s:
        if len(engine.scheduler.running) + len(engine.scheduler.waiting) < RUNNING:
            prompt = [rng.randrange(10, 500) for _ in range(rng.randrange(16, 256))]
            engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(32, 128), ignore_eos=True))
            num_requests += 1
        engine.step()
        num_steps += 1
    gc.callbacks.remove(on_collection)
    print(f"{'frozen' if args.freeze else 'default'}: {num_steps} steps, {num_requests} requests, "
          f"{len(gc.get_objects())} objects tracked")
    for generation, ms in sorted(pauses.items()):
        ms.sort()
        print(f"  generation {generation}: {len(ms)} collections, median {ms[len(ms) // 2]:.2f} ms, max {ms[-1]:.2f} ms")


if __name__ == "__main__":
    main()
