"""`mnemosyne profile`: measures step times on this device through the engine's own executor and
model, with synthetic plans, and writes the tables the step-time model interpolates; `--check`
times random held-out batches and reports the model's error.

Every synthetic request's KV lives in the same blocks: their contents do not change the time.
Attention is isolated by timing the same step again with attention left out. Runs on one device
(tp = pp = kvp = 1); larger layouts scale these tables and take collectives from the roofline.
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mnemosyne.config import EngineConfig
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan
from mnemosyne.request import SamplingParams
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, Profile, Profiled, detect_device

Shape = tuple[int, int]
"""(num_new_tokens, num_prefix_tokens) of one request in a step."""
_PARAMS = SamplingParams(max_tokens=1)
_CARRIER: Shape = (32, 0)
"""The multi-token chunk that keeps a step of decodes on the mixed (non-graph) path."""


@dataclass(frozen=True)
class Grid:
    """Where the tables are measured."""

    linear_num_tokens: tuple[int, ...]
    chunk_num_new: tuple[int, ...]
    chunk_num_prefix: tuple[int, ...]
    decode_num_decodes: tuple[int, ...]
    decode_mean_prefix: tuple[int, ...]
    repeats: int
    """Timed runs per point, after one warm-up; the median is kept."""
    num_check: int
    """Held-out batches timed by --check."""

    def clipped(self, max_prefix: int, max_tokens: int, max_seqs: int) -> Grid:
        def clip(values: tuple[int, ...], top: int) -> tuple[int, ...]:
            kept = tuple(v for v in values if v < top)
            return values if len(kept) == len(values) else (*kept, top)

        return replace(self, linear_num_tokens=clip(self.linear_num_tokens, max_tokens),
                       chunk_num_new=clip(self.chunk_num_new, max_tokens),
                       chunk_num_prefix=clip(self.chunk_num_prefix, max_prefix),
                       decode_num_decodes=clip(self.decode_num_decodes, max_seqs),
                       decode_mean_prefix=clip(self.decode_mean_prefix, max_prefix))


GPU_GRID = Grid(linear_num_tokens=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384),
                chunk_num_new=(32, 128, 512, 2048, 8192), chunk_num_prefix=(0, 4096, 16384, 65536, 131072),
                decode_num_decodes=(1, 4, 16, 64, 256), decode_mean_prefix=(128, 2048, 16384, 65536),
                repeats=5, num_check=60)
QUICK_GRID = Grid(linear_num_tokens=(16, 128), chunk_num_new=(32, 128), chunk_num_prefix=(0, 1024),
                  decode_num_decodes=(1, 8), decode_mean_prefix=(64, 1024), repeats=2, num_check=9)


class NullAttention:
    """Attention left out (the queries pass through), to time everything else in a step."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return q, q.new_zeros(q.shape[:2], dtype=torch.float32)


class StepTimer:
    """Times synthetic steps through an in-process executor: requests are registered by a warm-up
    step, then the same chunks are replayed `repeats` times."""

    def __init__(self, executor: Any, block_size: int, repeats: int):
        if not hasattr(executor, "worker"):
            raise ValueError("mnemosyne profile runs on one device: leave -tp, -pp and -kvp at 1")
        self.executor = executor
        self.runner = executor.worker.runner
        self.block_size = block_size
        self.repeats = repeats
        self.is_cuda = executor.worker.device.type == "cuda"
        self._ids = itertools.count()
        self._steps = itertools.count(1)
        self._live: tuple[str, ...] = ()

    def time_s(self, shapes: list[Shape], null_attention: bool = False) -> float:
        ids = [f"profile-{next(self._ids)}" for _ in shapes]
        new = tuple(NewRequest(rid, array("i", bytes(4 * (p + c))), _PARAMS, 0) for rid, (c, p) in zip(ids, shapes, strict=True))
        blocks = [tuple(range(-(-(p + c) // self.block_size))) for c, p in shapes]
        warm_up = tuple(ScheduledChunk(rid, p, c, b, ()) for rid, (c, p), b in zip(ids, shapes, blocks, strict=True))
        replay = tuple(ScheduledChunk(rid, p, c, (), ()) for rid, (c, p) in zip(ids, shapes, strict=True))
        backend = self.runner.backend
        if null_attention:
            self.runner.backend = NullAttention()
        try:
            self.executor.execute(StepPlan(next(self._steps), new, warm_up, self._live))
            self._live = tuple(ids)
            times = []
            for _ in range(self.repeats):
                if self.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                self.executor.execute(StepPlan(next(self._steps), (), replay, ()))  # samples: syncs
                times.append(time.perf_counter() - start)
        finally:
            self.runner.backend = backend
        return statistics.median(times)


def measure(timer: StepTimer, grid: Grid, model_name: str, device_name: str, dtype: str) -> Profile:
    """Every table of a Profile, with a progress bar on stderr."""
    num_points = (len(grid.linear_num_tokens) + 2 + 2 * len(grid.chunk_num_new) * len(grid.chunk_num_prefix)
                  + 3 * len(grid.decode_num_decodes) * len(grid.decode_mean_prefix) + 2)
    bar = tqdm(total=num_points, desc="profiling", unit="step", file=sys.stderr)

    def timed(shapes: list[Shape], null: bool = False) -> float:
        t = timer.time_s(shapes, null)
        bar.update()
        return t

    linear = tuple(timed([(t, 0)], null=True) for t in grid.linear_num_tokens)
    one, many = timed([(128, 0)], null=True), timed([(16, 0)] * 8, null=True)
    per_seq_s = max(0.0, (many - one) / 7)
    chunk = tuple(tuple(max(0.0, timed([(c, p)]) - timed([(c, p)], null=True)) for p in grid.chunk_num_prefix)
                  for c in grid.chunk_num_new)
    carrier_s = max(0.0, timed([_CARRIER]) - timed([_CARRIER], null=True))
    decode_attn, decode_step = [], []
    for d in grid.decode_num_decodes:
        attn_row, step_row = [], []
        for p in grid.decode_mean_prefix:
            mixed = [_CARRIER, *[(1, p)] * d]
            attn_row.append(max(0.0, timed(mixed) - timed(mixed, null=True) - carrier_s))
            step_row.append(timed([(1, p)] * d))
        decode_attn.append(tuple(attn_row))
        decode_step.append(tuple(step_row))
    bar.close()
    return Profile(model_name, device_name, dtype, 1, grid.linear_num_tokens, linear, per_seq_s,
                   grid.chunk_num_new, grid.chunk_num_prefix, chunk, grid.decode_num_decodes,
                   grid.decode_mean_prefix, tuple(decode_attn), tuple(decode_step))


def held_out_batches(grid: Grid, seed: int = 1234) -> list[tuple[str, list[Shape]]]:
    """Random batches off the grid: decode-only, chunks only, and mixed."""
    rng = random.Random(seed)
    top_prefix, top_new = grid.chunk_num_prefix[-1], grid.chunk_num_new[-1]
    top_tokens, top_decodes = grid.linear_num_tokens[-1], grid.decode_num_decodes[-1]

    def prefix() -> int:
        return 0 if rng.random() < 0.2 else int(rng.uniform(16, top_prefix))

    batches = []
    for i in range(grid.num_check):
        kind = ("decode", "chunks", "mixed")[i % 3]
        decodes = [(1, max(16, prefix())) for _ in range(rng.randint(1, top_decodes))] if kind != "chunks" else []
        chunks: list[Shape] = []
        if kind != "decode":
            room = top_tokens - len(decodes)
            for _ in range(rng.randint(1, 3)):
                c = min(room, 32 * rng.randint(1, max(1, top_new // 32)))
                if c >= 2:
                    chunks.append((c, prefix()))
                    room -= c
        batches.append((kind, decodes + chunks))
    return batches


def check(timer: StepTimer, latency: LatencyModel, grid: Grid) -> dict[str, Any]:
    """Relative error |predicted - measured| / measured on held-out batches, overall and by kind."""
    errors: dict[str, list[float]] = {"decode": [], "chunks": [], "mixed": []}
    for kind, shapes in tqdm(held_out_batches(grid), desc="checking", unit="step", file=sys.stderr):
        measured = timer.time_s(shapes)
        errors[kind].append(abs(latency.step_time_s(shapes) - measured) / measured)
    every = sorted(e for v in errors.values() for e in v)

    def stats(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                "max": values[-1], "num_batches": len(values)}

    return {"all": stats(every), **{kind: stats(v) for kind, v in errors.items() if v}}


def run(config: EngineConfig, output: Path | None, quick: bool, do_check: bool, max_prefix: int | None) -> int:
    from mnemosyne.engine.llm_engine import LLMEngine

    grid = QUICK_GRID if quick else GPU_GRID
    top_prefix = max_prefix or grid.chunk_num_prefix[-1]
    top_tokens = max(grid.linear_num_tokens[-1], grid.chunk_num_new[-1] + grid.decode_num_decodes[-1])
    config = replace(config, max_model_len=top_prefix + top_tokens + config.block_size,
                     max_num_batched_tokens=top_tokens, max_num_seqs=max(config.max_num_seqs, grid.decode_num_decodes[-1]))
    engine = LLMEngine(config)
    try:
        return _profile(engine, config, grid, top_prefix, top_tokens, output, do_check)
    finally:
        engine.shutdown()


def _profile(engine: Any, config: EngineConfig, grid: Grid, top_prefix: int, top_tokens: int,
             output: Path | None, do_check: bool) -> int:
    capacity = engine.executor.info.num_kv_blocks * config.block_size
    grid = grid.clipped(min(top_prefix, capacity - top_tokens), top_tokens, config.max_num_seqs)
    timer = StepTimer(engine.executor, config.block_size, grid.repeats)
    device = engine.executor.info.device
    spec = DEVICES[detect_device(device)]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if output is not None:
        profile = measure(timer, grid, engine.model_name, device_name, engine.executor.info.dtype)
        profile.save(output)
        print(f"profile written to {output}")
    elif config.latency_profile is not None:
        profile = Profile.load(config.latency_profile)
    else:
        raise ValueError("give -o PATH to write a profile, or --latency-profile PATH with --check to check one")
    if do_check:
        latency = LatencyModel(Profiled(profile), engine.model_config, spec)
        report = check(timer, latency, grid)
        print(format_check(report))
        if output is not None:
            profile.save(output, {"check": report})
    return 0


def format_check(report: dict[str, Any]) -> str:
    lines = ["prediction error on held-out batches (|predicted - measured| / measured)",
             f"{'batches':<8} {'n':>4} {'median':>8} {'p90':>8} {'max':>8}"]
    for kind, s in report.items():
        lines.append(f"{kind:<8} {s['num_batches']:>4} {s['median']:>8.1%} {s['p90']:>8.1%} {s['max']:>8.1%}")
    lines.append("target on GPU: median <= 5%, p90 <= 10%")
    return "\n".join(lines)
