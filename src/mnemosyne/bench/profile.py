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
from mnemosyne.scheduler.latency_model import (
    DEVICES,
    LatencyModel,
    Profile,
    Profiled,
    detect_device,
    interp,
    uneven_prefixes,
)

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
    decode_prefix_tokens: tuple[int, ...]
    """Sum of the decodes' prefixes: each of D decodes has about 1/D of it."""
    repeats: int
    """Timed runs per point, after one warm-up; the median is kept."""
    num_check: int
    """Held-out batches timed by --check."""

    def clipped(self, max_prefix: int, max_tokens: int, max_seqs: int, max_kv_tokens: int) -> Grid:
        def clip(values: tuple[int, ...], top: int) -> tuple[int, ...]:
            kept = tuple(v for v in values if v < top)
            return values if len(kept) == len(values) else (*kept, top)

        return replace(self, linear_num_tokens=clip(self.linear_num_tokens, max_tokens),
                       chunk_num_new=clip(self.chunk_num_new, max_tokens),
                       chunk_num_prefix=clip(self.chunk_num_prefix, max_prefix),
                       decode_num_decodes=clip(self.decode_num_decodes, max_seqs),
                       decode_prefix_tokens=clip(self.decode_prefix_tokens, max_kv_tokens))


GPU_GRID = Grid(linear_num_tokens=(16, *range(64, 2048, 64), *range(2048, 4096, 128), 4096, 8192, 16384),
                chunk_num_new=(32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024, 1280, 1536, 2048, 3072,
                               4096, 8192),
                chunk_num_prefix=(0, 4096, 8192, 16384, 32768, 65536, 131072, 262144),
                decode_num_decodes=(1, 4, 16, 64, 256), decode_prefix_tokens=(0, 32768, 131072, 524288),
                repeats=3, num_check=45)
"""Dense where a step budget binds when serving (50 ms is about 2,000 tokens on an H200). The linears'
time steps with the token count (cuBLAS's tiles: 29.1 ms at 1280 tokens, 39.9 at 1536, call73), and
between points at 1024 and 2048 whole short prompts of 1.3-1.6K tokens at prefix 0 ran at a median
1.10x their prediction and up to 1.5x (call71's step logs), most of the steps over a 50 ms budget;
points 256 apart left them at 1.1-1.3x (call73). Chunk rows at multiples of 512 are cuDNN's whole
waves of tiles on an H200 (`Profiled.cost_tokens`), the rows between for the Triton kernel's
smoother cost."""
QUICK_GRID = Grid(linear_num_tokens=(16, 128), chunk_num_new=(32, 128), chunk_num_prefix=(0, 1024),
                  decode_num_decodes=(1, 8), decode_prefix_tokens=(0, 2048), repeats=2, num_check=9)


class NullAttention:
    """Attention left out (the queries pass through), to time everything else in a step."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return q, q.new_zeros(q.shape[:2], dtype=torch.float32)


class StepTimer:
    """Times synthetic steps through an in-process executor: requests are registered by a warm-up
    step, then the same chunks are replayed `repeats` times. Each request gets its own blocks (as
    in a real batch, so caches are not flattered) until the pool runs out, then they wrap around."""

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
        self._live: tuple[str, ...] = tuple(self.runner.requests)
        """Requests live on the worker, freed by the next timed step; at first, any the engine left there,
        such as its GPU warm-up prompt, whose release rides on a next scheduled plan that the profile
        never sends (the block-table row it held made call72's profile fail at its 256-decode batch)."""
        self.num_blocks = executor.info.num_kv_blocks
        self._next_block = 0

    def _blocks(self, num_tokens: int) -> tuple[int, ...]:
        n = -(-num_tokens // self.block_size)
        if self._next_block + n > self.num_blocks:
            self._next_block = 0
        start, self._next_block = self._next_block, self._next_block + n
        return tuple(range(start, start + n))

    def time_s(self, shapes: list[Shape], null_attention: bool = False) -> float:
        ids = [f"profile-{next(self._ids)}" for _ in shapes]
        new = tuple(NewRequest(rid, array("i", bytes(4 * (p + c))), _PARAMS, 0) for rid, (c, p) in zip(ids, shapes, strict=True))
        self._next_block = 0
        blocks = [self._blocks(p + c) for c, p in shapes]
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
    num_points = (len(grid.linear_num_tokens) + 2 + len(grid.chunk_num_new) * len(grid.chunk_num_prefix)
                  + 9 * len(grid.decode_num_decodes) * len(grid.decode_prefix_tokens) + 2)
    bar = tqdm(total=num_points, desc="profiling", unit="step", file=sys.stderr)

    def timed(shapes: list[Shape], null: bool = False) -> float:
        t = timer.time_s(shapes, null)
        bar.update()
        return t

    linear = tuple(timed([(t, 0)], null=True) for t in grid.linear_num_tokens)
    one, many = timed([(128, 0)], null=True), timed([(16, 0)] * 8, null=True)
    per_seq_s = max(0.0, (many - one) / 7)
    # A chunk's term is all its step costs beyond the linear layers at its size: attention, and any
    # host work that grows with its prefix.
    chunk = tuple(tuple(max(0.0, timed([(c, p)]) - interp(grid.linear_num_tokens, linear, c))
                        for p in grid.chunk_num_prefix) for c in grid.chunk_num_new)
    carrier_s = max(0.0, timed([_CARRIER]) - timed([_CARRIER], null=True))
    tables: dict[str, list[tuple[float, ...]]] = {f"{name}_{part}": [] for name in ("even", "skew", "uneven")
                                                   for part in ("attn", "step")}
    for d in grid.decode_num_decodes:
        rows: dict[str, list[float]] = {k: [] for k in tables}
        for total in grid.decode_prefix_tokens:
            for name, decodes in (("even", [(1, total // d + (i < total % d)) for i in range(d)]),
                                  ("skew", [(1, total)] + [(1, 0)] * (d - 1)),
                                  ("uneven", [(1, p) for p in uneven_prefixes(d, total)])):
                mixed = [_CARRIER, *decodes]
                rows[f"{name}_attn"].append(max(0.0, timed(mixed) - timed(mixed, null=True) - carrier_s))
                rows[f"{name}_step"].append(timed(decodes))
        for k in tables:
            tables[k].append(tuple(rows[k]))
    bar.close()
    graphs = timer.runner.graphs
    return Profile(model_name, device_name, dtype, 1, grid.linear_num_tokens, linear, per_seq_s,
                   grid.chunk_num_new, grid.chunk_num_prefix, chunk, grid.decode_num_decodes,
                   grid.decode_prefix_tokens, tuple(tables["even_attn"]), tuple(tables["even_step"]),
                   tuple(tables["skew_attn"]), tuple(tables["skew_step"]),
                   tuple(graphs.buckets) if graphs is not None else (),
                   tuple(tables["uneven_attn"]), tuple(tables["uneven_step"]))


def held_out_batches(grid: Grid, seed: int = 1234) -> list[tuple[str, list[Shape]]]:
    """Random batches off the grid: decode-only, chunks only, and mixed. Decode prefixes are uneven
    (a few long contexts among short ones) and all the KV fits the measured ranges."""
    rng = random.Random(seed)
    top_prefix, top_new = grid.chunk_num_prefix[-1], grid.chunk_num_new[-1]
    top_tokens, top_decodes = grid.linear_num_tokens[-1], grid.decode_num_decodes[-1]
    batches = []
    for i in range(grid.num_check):
        kind = ("decode", "chunks", "mixed")[i % 3]
        chunks: list[Shape] = []
        room = top_tokens - top_decodes
        for _ in range(rng.randint(1, 3) if kind != "decode" else 0):
            c = min(room, 32 * rng.randint(1, max(1, top_new // 32)))
            if c >= 2:
                chunks.append((c, 0 if rng.random() < 0.2 else rng.randrange(16, top_prefix)))
                room -= c
        decodes: list[Shape] = []
        if kind != "chunks":
            num = rng.randint(1, top_decodes)
            total = rng.uniform(0, grid.decode_prefix_tokens[-1])
            weights = [rng.random() ** 3 for _ in range(num)]
            decodes = [(1, int(total * w / sum(weights))) for w in weights]
        batches.append((kind, decodes + chunks))
    return batches


def check(timer: StepTimer, latency: LatencyModel, grid: Grid) -> dict[str, Any]:
    """Relative error |predicted - measured| / measured on held-out batches, overall and by kind,
    and every batch's counts and times."""
    errors: dict[str, list[float]] = {"decode": [], "chunks": [], "mixed": []}
    rows = []
    for kind, shapes in tqdm(held_out_batches(grid), desc="checking", unit="step", file=sys.stderr):
        measured, predicted = timer.time_s(shapes), latency.step_time_s(shapes)
        errors[kind].append(abs(predicted - measured) / measured)
        decodes = [p for n, p in shapes if n == 1]
        rows.append({"kind": kind, "num_decodes": len(decodes), "decode_prefix_tokens": sum(decodes),
                     "chunks": [s for s in shapes if s[0] > 1], "measured_s": measured, "predicted_s": predicted})
    return _report(errors, rows)


def _report(errors: dict[str, list[float]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    every = sorted(e for v in errors.values() for e in v)

    def stats(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                "max": values[-1], "num_batches": len(values)}

    return {"all": stats(every), **{kind: stats(v) for kind, v in errors.items() if v}, "batches": rows}


def run(config: EngineConfig, output: Path | None, quick: bool, do_check: bool, max_prefix: int | None) -> int:
    from mnemosyne.engine.llm_engine import LLMEngine

    grid = QUICK_GRID if quick else GPU_GRID
    top_prefix = max_prefix or grid.chunk_num_prefix[-1]
    top_tokens = max(grid.linear_num_tokens[-1], grid.chunk_num_new[-1] + grid.decode_num_decodes[-1])
    longest = max(top_prefix, grid.decode_prefix_tokens[-1]) + top_tokens + config.block_size
    config = replace(config, max_model_len=longest,
                     max_num_batched_tokens=top_tokens, max_num_seqs=max(config.max_num_seqs, grid.decode_num_decodes[-1] + 1))
    engine = LLMEngine(config)
    try:
        return _profile(engine, config, grid, top_prefix, top_tokens, output, do_check)
    finally:
        engine.shutdown()


def _profile(engine: Any, config: EngineConfig, grid: Grid, top_prefix: int, top_tokens: int,
             output: Path | None, do_check: bool) -> int:
    capacity = engine.executor.info.num_kv_blocks * config.block_size
    grid = grid.clipped(min(top_prefix, capacity - top_tokens), top_tokens, config.max_num_seqs - 1,  # + carrier
                        capacity - top_tokens)
    timer = StepTimer(engine.executor, config.block_size, grid.repeats)
    device = engine.executor.info.device
    spec = DEVICES[detect_device(device)]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if output is not None:
        profile = measure(timer, grid, engine.model_name, device_name, engine.executor.info.dtype)
        split = getattr(timer.runner.backend, "small_chunk_rows", None)
        if split is not None and device.startswith("cuda"):  # the GPU backend: which chunks ran on cuDNN
            profile = replace(profile, num_sms=torch.cuda.get_device_properties(device).multi_processor_count,
                              num_q_heads=engine.model_config.num_heads,
                              num_kv_heads=engine.model_config.num_kv_heads, triton_chunk_rows=split)
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


def recheck(profile: Profile, measured: list[dict[str, Any]], latency: LatencyModel,
            num_check: int = 45) -> dict[str, Any]:
    """`check`'s report again from the batches a past check measured (`measured`, its report's
    "batches"), with the predictions of `latency` as it is now: a change to the step-time model judged
    on the GPU's held-out batches without the GPU. The batches are rebuilt from the profile's axes, as
    `check` drew them."""
    grid = Grid(profile.linear_num_tokens, profile.chunk_num_new, profile.chunk_num_prefix, profile.decode_num_decodes,
                profile.decode_prefix_tokens, repeats=1, num_check=num_check)
    errors: dict[str, list[float]] = {"decode": [], "chunks": [], "mixed": []}
    rows = []
    for (kind, shapes), row in zip(held_out_batches(grid), measured, strict=True):
        decodes = [p for n, p in shapes if n == 1]
        if (kind, len(decodes), sum(decodes)) != (row["kind"], row["num_decodes"], row["decode_prefix_tokens"]):
            raise ValueError("the measured batches are not the ones this version draws for the profile's grid")
        predicted = latency.step_time_s(shapes)
        errors[kind].append(abs(predicted - row["measured_s"]) / row["measured_s"])
        rows.append({**row, "predicted_s": predicted})
    return _report(errors, rows)


def format_check(report: dict[str, Any]) -> str:
    lines = ["prediction error on held-out batches (|predicted - measured| / measured)",
             f"{'batches':<8} {'n':>4} {'median':>8} {'p90':>8} {'max':>8}"]
    for kind, s in report.items():
        if kind == "batches":
            continue
        lines.append(f"{kind:<8} {s['num_batches']:>4} {s['median']:>8.1%} {s['p90']:>8.1%} {s['max']:>8.1%}")
    lines.append("target on GPU: median <= 5%, p90 <= 10%")
    return "\n".join(lines)
