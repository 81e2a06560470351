"""Host time of a mixed serving step on one GPU: a long prompt's chunk over its cached prefix, batched
with the decodes of chat requests, the step that serving's step log showed bound by the host (its
planning and launch holding the engine thread about as long as the step took).

For each chunk size the long prompt is first prefilled to --prefix tokens; then --steps mixed steps
are timed three ways, each a window of its own:
  plain     host time of each phase of the launch (prepare inputs, forward, sample) and of the whole
            engine step; the device and host allocators' counters over the window (a cudaMalloc
            retry frees cached blocks, which waits for the device; a new pinned block is a
            cudaHostAlloc);
  guarded   each launch behind a 300 ms busy kernel: its host time alone, and whether it waited
            for the device (the busy kernel had finished when the launch returned);
  profiled  torch.profiler over a few steps: operators and CUDA runtime calls by host time.

    python benchmarks/mixed_step_host.py [--prefix 65536] [--chunks 512,1536] [--decodes 20] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.executor.step_profiler import allocator_counters
from mnemosyne.request import SamplingParams
from mnemosyne.runner import model_runner

BUSY_MS = 300.0


class Spans:
    """Host milliseconds per phase, per step of the current window."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.steps:
                    self.steps[-1][label] += (time.perf_counter() - start) * 1e3

        setattr(owner, name, timed)

    def summary(self) -> str:
        labels = sorted({label for step in self.steps for label in step})
        return "  ".join(f"{label} {statistics.median(s[label] for s in self.steps):.2f}" for label in labels)


def _cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _long_chunk_steps(engine: LLMEngine, long_id: str, steps: int, before=None) -> int:
    """Step until `steps` steps have held a chunk of the long prompt; returns the steps taken."""
    taken = seen = 0
    while seen < steps:
        if before is not None:
            before()
        engine.step()
        taken += 1
        plan = engine.last_plan
        if plan is not None and any(c.request_id == long_id and c.num_new_tokens > 1 for c in plan.chunks):
            seen += 1
    return taken


def run(chunk: int, args: argparse.Namespace, out_dir: Path) -> None:
    cuda = args.device == "cuda"
    config = EngineConfig(model=args.model, device=args.device, max_model_len=args.prefix + 8 * args.steps * chunk + 4096,
                          chunking=f"fixed:{chunk}", max_num_batched_tokens=chunk + args.decodes, scheduler="fcfs",
                          cudnn_ragged=cuda or None, triton_chunk_rows=8192 if cuda else None,
                          async_prefill=False, seed=0)
    engine = LLMEngine(config)
    try:
        vocab = engine.model_config.vocab_size
        generator = torch.Generator().manual_seed(chunk)
        for _ in range(args.decodes):
            prompt = torch.randint(3, vocab, (256,), generator=generator).tolist()
            engine.add_request(prompt, SamplingParams(max_tokens=100_000, ignore_eos=True))
        while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
            engine.step()
        long_prompt = torch.randint(3, vocab, (config.max_model_len - 64,), generator=generator).tolist()
        long_id = engine.add_request(long_prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        long_request = engine.scheduler.requests[long_id]
        print(f"== chunk {chunk}: prefilling {args.prefix} tokens of the long prompt beside {args.decodes} decodes")
        while long_request.num_computed_tokens < args.prefix:
            engine.step()

        runner = engine.executor.worker.runner
        engine_device = torch.device(args.device)
        spans = Spans()
        spans.wrap(runner, "launch", "launch")
        spans.wrap(runner, "prepare", "prepare")
        spans.wrap(runner, "_forward", "forward")
        spans.wrap(model_runner, "sample", "sample")
        spans.wrap(engine, "step", "engine step")
        _sync()
        before = allocator_counters(engine_device)
        start_s = time.perf_counter()
        taken = _long_chunk_steps(engine, long_id, args.steps, before=spans.new_step)
        _sync()
        wall_ms = (time.perf_counter() - start_s) * 1e3 / taken
        after = allocator_counters(engine_device)
        delta = {k: after[k] - before[k] for k in after}
        print(f"plain ({taken} steps, {wall_ms:.1f} ms each, prefix now {long_request.num_computed_tokens}):"
              f" medians, host ms: {spans.summary()}")
        print("  allocators over the window: " + ", ".join(f"{k} {v:g}" for k, v in delta.items()))
        if not cuda:
            return

        cycles = int(_cycles_per_ms() * BUSY_MS)
        launch = runner.launch
        guarded_ms, waited = [], 0

        def guarded(plan):
            nonlocal waited
            torch.cuda._sleep(cycles)
            busy = torch.cuda.Event()
            busy.record()
            start = time.perf_counter()
            step = launch(plan)
            guarded_ms.append((time.perf_counter() - start) * 1e3)
            waited += busy.query()
            return step

        runner.launch = guarded
        _long_chunk_steps(engine, long_id, max(3, args.steps // 4))
        runner.launch = launch
        torch.cuda.synchronize()
        print(f"guarded ({len(guarded_ms)} launches behind {BUSY_MS:.0f} ms of busy device): host ms median "
              f"{statistics.median(guarded_ms):.2f}, max {max(guarded_ms):.2f}; waited for the device: {waited}")

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            taken = _long_chunk_steps(engine, long_id, args.profile_steps)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out_dir / f"chunk{chunk}_cpu.txt").write_text(f"{taken} steps\n{table}\n")
        print(f"profiled ({taken} steps), top operators and runtime calls by host time:")
        print("\n".join(table.splitlines()[:22]))
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the plain window")
    parser.add_argument("--prefix", type=int, default=65536)
    parser.add_argument("--chunks", default="512,1536")
    parser.add_argument("--decodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("-o", "--out", default=os.environ.get("OUT", "out/mixed_step_host"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for chunk in (int(c) for c in args.chunks.split(",")):
        run(chunk, args, out_dir)


if __name__ == "__main__":
    main()
