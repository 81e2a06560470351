"""Host time of a mixed serving step on one GPU, the steps that serving's step log showed taking as
long as their planning and launch held the engine thread. Two kinds, each batched with the decodes of
--decodes chat requests:
  prompts   a new chat prompt of 128-700 tokens prefilled whole (most of call82's slow steps);
  long      a --chunk-token chunk of a long prompt over its cached prefix of --prefix tokens.

Each kind is timed in windows of its own:
  plain     host time of each phase of the launch (prepare inputs, forward, sample) and of the whole
            engine step; the device and host allocators' counters over the window (a cudaMalloc
            retry frees cached blocks, which waits for the device; a new pinned block is a
            cudaHostAlloc);
  guarded   each launch behind a 300 ms busy kernel: its host time alone, and whether it waited
            for the device (the busy kernel had finished when the launch returned: a wait, or more
            launches than the device's queue holds);
  python    cProfile over the launches: where the Python time goes (torch.profiler sees operators,
            not the interpreter between them, nor Triton's launcher);
  torch     torch.profiler: operators and CUDA runtime calls by host time, and launches per step.
Then `ops`: the host time of single operations behind a busy device (a GEMM at a fixed and at a
changing row count, the Triton norm and activation kernels, a small elementwise op).

    python benchmarks/mixed_step_host.py [--prefix 65536] [--chunk 512] [--decodes 20] [--steps 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.bench.floors import behind_busy_device, busy_cycles
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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Workload:
    """One engine, its chat decodes running throughout, and the two kinds of mixed step."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = args.device == "cuda"
        # fixed chunks that hold a whole chat prompt; async prefill off, so each step lands before the next
        self.config = EngineConfig(model=args.model, device=args.device, max_model_len=args.prefix + 64 * args.chunk,
                                   chunking=f"fixed:{max(args.chunk, MAX_PROMPT)}", scheduler="fcfs",
                                   max_num_batched_tokens=max(args.chunk, MAX_PROMPT) + args.decodes + 8,
                                   cudnn_ragged=self.cuda or None, triton_chunk_rows=8192 if self.cuda else None,
                                   async_prefill=False, seed=0, layer_graph_tokens=args.layer_graph_tokens)
        self.engine = LLMEngine(self.config)
        self.vocab = self.engine.model_config.vocab_size
        self.random = random.Random(0)
        for _ in range(args.decodes):
            self.engine.add_request(self._prompt(256), SamplingParams(max_tokens=1_000_000, ignore_eos=True))
        while any(r.num_output_tokens == 0 for r in self.engine.scheduler.requests.values()):
            self.engine.step()
        self.long_id: str | None = None

    def _prompt(self, n: int) -> list[int]:
        return [self.random.randrange(3, self.vocab) for _ in range(n)]

    def prompts(self, steps: int, before: Callable[[], None] | None = None) -> int:
        """`steps` steps, each prefilling a new chat prompt (answered with 4 tokens) beside the decodes."""
        for _ in range(steps):
            self.engine.add_request(self._prompt(self.random.randint(128, MAX_PROMPT)),
                                    SamplingParams(max_tokens=4, ignore_eos=True))
            if before is not None:
                before()
            self.engine.step()
        return steps

    def start_long(self) -> None:
        """Admit the long prompt and prefill it to --prefix tokens."""
        prompt = self._prompt(self.config.max_model_len - 64)
        self.long_id = self.engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        request = self.engine.scheduler.requests[self.long_id]
        while request.num_computed_tokens < self.args.prefix:
            self.engine.step()

    def long(self, steps: int, before: Callable[[], None] | None = None) -> int:
        """Step until `steps` steps have held a chunk of the long prompt; returns the steps taken."""
        taken = seen = 0
        while seen < steps:
            if before is not None:
                before()
            self.engine.step()
            taken += 1
            plan = self.engine.last_plan
            if plan is not None and any(c.request_id == self.long_id and c.num_new_tokens > 1 for c in plan.chunks):
                seen += 1
        return taken


def guard(work: Workload, run_steps: Callable[..., int]) -> None:
    """Launches behind a busy device: their host time alone, and whether any waited for the device."""
    runner = work.engine.executor.worker.runner
    cycles = busy_cycles(BUSY_MS)
    launch = runner.launch
    guarded_ms, waited = [], 0

    def guarded(plan):
        nonlocal waited
        step, host_ms, has_waited = behind_busy_device(lambda: launch(plan), cycles)
        guarded_ms.append(host_ms)
        waited += has_waited
        return step

    runner.launch = guarded
    run_steps(max(3, work.args.steps // 4))
    runner.launch = launch
    torch.cuda.synchronize()
    print(f"guarded ({len(guarded_ms)} launches behind {BUSY_MS:.0f} ms of busy device): host ms median "
          f"{statistics.median(guarded_ms):.2f}, max {max(guarded_ms):.2f}; waited for the device: {waited}")


def measure(work: Workload, kind: str, out_dir: Path) -> None:
    args, engine = work.args, work.engine
    run_steps = getattr(work, kind)
    runner = engine.executor.worker.runner
    device = torch.device(args.device)
    print(f"== {kind}: {args.decodes} decodes" + (f", chunks of {work.config.chunking} over {args.prefix}+ tokens"
                                                  if kind == "long" else ", a new prompt of 128-700 tokens a step"))
    spans = Spans()
    originals = {name: getattr(runner, name) for name in ("launch", "prepare", "_forward")}
    original_sample, original_step = model_runner.sample, engine.step
    spans.wrap(runner, "launch", "launch")
    spans.wrap(runner, "prepare", "prepare")
    spans.wrap(runner, "_forward", "forward")
    spans.wrap(model_runner, "sample", "sample")
    spans.wrap(engine, "step", "engine step")
    _sync()
    before = allocator_counters(device)
    start_s = time.perf_counter()
    taken = run_steps(args.steps, before=spans.new_step)
    _sync()
    wall_ms = (time.perf_counter() - start_s) * 1e3 / taken
    after = allocator_counters(device)
    for name, original in originals.items():
        setattr(runner, name, original)
    model_runner.sample, engine.step = original_sample, original_step
    print(f"plain ({taken} steps, {wall_ms:.1f} ms each): medians, host ms: {spans.summary()}")
    if after:
        print("  allocators over the window: " + ", ".join(f"{k} {after[k] - before[k]:g}" for k in after))
    launch = runner.launch
    if work.cuda:
        guard(work, run_steps)
    python = cProfile.Profile()

    def profiled(plan):
        python.enable()
        try:
            return launch(plan)
        finally:
            python.disable()

    runner.launch = profiled
    taken = run_steps(args.profile_steps)
    runner.launch = launch
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(25)
    (out_dir / f"{kind}_python.txt").write_text(f"{taken} steps\n{text.getvalue()}")
    print(f"python ({taken} steps under cProfile), top functions by own time:")
    lines = text.getvalue().splitlines()
    first = next(i for i, line in enumerate(lines) if "tottime" in line)
    print("\n".join(lines[first:first + 18]))
    if not work.cuda:
        return

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        taken = run_steps(args.profile_steps)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    device_ms = sum(e.self_device_time_total for e in events) / 1e3
    table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    (out_dir / f"{kind}_torch.txt").write_text(f"{taken} steps\n{table}\n")
    print(f"torch ({taken} steps): {launches / taken:.0f} kernel launches and {device_ms / taken:.1f} ms of kernels "
          f"a step; top operators by host time:")
    print("\n".join(table.splitlines()[3:15]))


def ops(args: argparse.Namespace) -> None:
    """Host microseconds per call of single operations, each run behind a busy device."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    from mnemosyne.layers.triton_ops import add_rms_norm, silu_and_mul

    weight = torch.randn(4096, 4096, device=device, dtype=dtype)
    rows = [300 + 7 * i for i in range(64)]
    inputs = {m: torch.randn(m, 4096, device=device, dtype=dtype) for m in rows}
    x, residual = inputs[rows[0]], torch.randn_like(inputs[rows[0]])
    norm_weight = torch.ones(4096, device=device, dtype=dtype)
    gate_up = torch.randn(rows[0], 2 * 14336, device=device, dtype=dtype)
    small = torch.zeros(16, device=device)
    cases = {
        "x.add_(1) (aten elementwise)": lambda i: small.add_(1),
        "mm, the same rows each call": lambda i: torch.mm(x, weight),
        "mm, other rows each call": lambda i: torch.mm(inputs[rows[i % len(rows)]], weight),
        "F.linear, the same rows": lambda i: torch.nn.functional.linear(x, weight),
        "Triton add_rms_norm": lambda i: add_rms_norm(x, norm_weight, 1e-5, residual),
        "Triton silu_and_mul": lambda i: silu_and_mul(gate_up),
    }
    cycles = busy_cycles(BUSY_MS)
    print("== ops: host us per call behind a busy device (200 calls each)")
    for name, call in cases.items():
        for i in range(3):
            call(i)  # compiled, tuned, planned
        _, host_ms, waited = behind_busy_device(lambda call=call: [call(i) for i in range(200)], cycles)
        print(f"  {name:32s} {host_ms * 1e3 / 200:7.1f} us{' (waited for the device)' if waited else ''}")


def gemms(libraries: list[str]) -> None:
    """The host time of a GEMM at a row count it has not met before, against one it has: a serving
    step's token count changes from step to step. Each call timed alone behind a busy device. The
    first library runs on a process that has loaded no GEMM kernel yet (a later one finds the kernels
    the first loaded: cuBLAS goes through cuBLASLt's)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    cycles = busy_cycles(BUSY_MS)
    # Llama-3-8B's linears (out, in): qkv, o, gate_up, down
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.01 for n, k in shapes]
    inputs = {k: torch.randn(4096, k, device=device, dtype=dtype) for k in (4096, 14336)}
    big = {k: torch.randn(16384, k, device=device, dtype=dtype) for k in (4096, 14336)}

    def timed(calls: list[Callable[[], object]]) -> list[float]:
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        out = []
        for call in calls:
            start = time.perf_counter()
            call()
            out.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        return out

    print("== gemms: host us per F.linear call behind a busy device, row counts new to the process and again")
    base = 1000
    for library in libraries:
        torch.backends.cuda.preferred_blas_library(library)
        rows = [base + 13 * i for i in range(24)]
        base += 1000
        calls = [lambda m=m: torch.nn.functional.linear(inputs[4096][:m], weights[1]) for m in rows]
        first, again = timed(calls), timed(calls)
        print(f"  {library:9s} o_proj shape: new rows median {statistics.median(first):8.1f} max {max(first):8.1f}"
              f" | the same rows again median {statistics.median(again):6.1f} max {max(again):6.1f}")
        # one step's 128 GEMMs (32 layers of the four linears) at a new row count, then at the same again
        for label, m in (("a new row count", base + 1), ("the same again", base + 1)):
            step = [lambda m=m, w=w, k=k: torch.nn.functional.linear(inputs[k][:m], w)
                    for _ in range(32) for w, (_, k) in zip(weights, shapes, strict=True)]
            total = sum(timed(step))
            print(f"  {library:9s} a step's 128 GEMMs at {label}: {total / 1e3:.2f} ms of host time")
        rates = []
        for m in (16384, 2048, 600):
            flop = sum(2 * m * n * k for n, k in shapes) * 20
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(2):  # the second pass is timed
                start.record()
                for _ in range(20):
                    for w, (_, k) in zip(weights, shapes, strict=True):
                        torch.nn.functional.linear(inputs[k][:m] if m <= 4096 else big[k][:m], w)
                end.record()
                torch.cuda.synchronize()
            rates.append(f"{m} rows {flop / start.elapsed_time(end) / 1e9:.0f}")
        print(f"  {library:9s} device TFLOP/s over the four linears: " + ", ".join(rates))
    torch.backends.cuda.preferred_blas_library("cublas")


MAX_PROMPT = 700


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the plain window")
    parser.add_argument("--prefix", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blas", default="cublas,cublaslt", help="the libraries gemms times, in this order")
    parser.add_argument("--only-ops", action="store_true", help="only the single-op timings (ops, gemms)")
    parser.add_argument("--layer-graph-tokens", type=int, default=None,
                        help="the engine's --layer-graph-tokens (0: mixed steps launched eagerly)")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("-o", "--out", default=os.environ.get("OUT", "out/mixed_step_host"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.only_ops:
        gemms(args.blas.split(","))
        ops(args)
        return
    work = Workload(args)
    try:
        measure(work, "prompts", out_dir)
        work.start_long()
        measure(work, "long", out_dir)
    finally:
        work.engine.shutdown()
    if work.cuda:
        ops(args)
        gemms(args.blas.split(","))


if __name__ == "__main__":
    main()
