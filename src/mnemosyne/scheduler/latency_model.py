"""Step-time model: predicts one engine step's time from its batch (new tokens and KV prefix of each
request) and the parallel layout. Costs come from a profile measured on the hardware
(`mnemosyne profile`) or, without one, from a roofline of the device's nominal rates.

A step's time is `base_s(tokens, seqs) + Σ chunk_attention_s(new, prefix) + decode_attention_s(...)`:
the linear layers, norms, collectives and sampling depend on the batch's totals, a chunk's attention
on the chunk alone, and one-token chunks (decodes) are costed together, as one kernel runs them.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

from mnemosyne.attention.routing import cudnn_cost_tokens, routes_to_triton
from mnemosyne.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """Nominal rates of one device, for the roofline fallback and for collectives a profile lacks."""

    name: str
    peak_flops: float
    """Dense matmul rate at the serving dtype, FLOP/s."""
    flops_efficiency: float
    """Share of peak_flops that whole-model GEMMs and attention kernels reach."""
    hbm_bytes_per_s: float
    """Nominal memory bandwidth."""
    bandwidth_efficiency: float
    """Share of hbm_bytes_per_s that streaming reads (weights, KV) reach."""
    memory_bytes: float
    """Device memory, for the simulator's KV capacity."""
    link_bytes_per_s: float
    """All-reduce bus bandwidth between devices of one node (TP, PP)."""
    network_bytes_per_s: float
    """Per-device bandwidth between nodes (KVP merges across replicas)."""
    collective_latency_s: float
    """Latency of one small collective."""
    step_overhead_s: float
    """Fixed host and launch cost of one step."""
    dtype_bytes: int
    """Bytes per weight and KV element at the serving dtype."""


DEVICES: dict[str, DeviceSpec] = {
    # bf16 dense ~790 TFLOP/s was measured for an 8192³ matmul on an H200 (the H100 SXM has the same
    # tensor cores); whole models reach ~0.75 of it. Bandwidths are nominal HBM3 / HBM3e.
    "h100": DeviceSpec("NVIDIA H100 SXM", 790e12, 0.75, 3.35e12, 0.85, 80e9, 350e9, 50e9, 20e-6, 1e-3, 2),
    "h200": DeviceSpec("NVIDIA H200", 790e12, 0.75, 4.8e12, 0.85, 141e9, 350e9, 50e9, 20e-6, 1e-3, 2),
    # A small x86 host in float32: order-of-magnitude only.
    "cpu": DeviceSpec("CPU", 1e11, 0.5, 2e10, 0.6, 16e9, 5e9, 5e9, 20e-6, 2e-3, 4),
}


def device_spec(name: str) -> DeviceSpec:
    key = name.lower()
    if key not in DEVICES:
        raise ValueError(f"--roofline-device must be one of {sorted(DEVICES)} or auto, got {name!r}")
    return DEVICES[key]


def detect_device(device: str) -> str:
    """DEVICES key for a resolved torch device string, without creating a CUDA context here."""
    if not device.startswith("cuda"):
        return "cpu"
    name = ""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
    except Exception:  # no NVML: fall through to the default
        pass
    if "H200" in name:
        return "h200"
    if "H100" not in name:
        logger.warning("unknown GPU %r: the roofline step-time model assumes an H100", name)
    return "h100"


@dataclass(frozen=True)
class Layout:
    """How one model replica is split, and how KVP spreads a long request's KV."""

    tp: int = 1
    pp: int = 1
    kvp: int = 1
    kvp_group_max_tokens: int | None = None
    """Most KV tokens of one request per KVP group; None: one group holds a whole request."""


class StepCosts(Protocol):
    """The seam between a measured profile and the roofline. Times in seconds, for one step through
    every layer (all pipeline stages in turn) on one tensor-parallel shard. One-token chunks
    (decodes) are costed together: the GPU runs them in one kernel, and a step of nothing else
    replays a CUDA graph."""

    measured_tp: int
    """Tensor-parallel size whose collectives the costs already include (1: none)."""

    def base_s(self, num_tokens: int, num_seqs: int, num_decodes: int = 0) -> float:
        """Everything but attention in a step with a multi-token chunk: fixed cost, linear layers,
        norms, LM head and sampling. num_seqs counts every request of the step, num_decodes those of
        them with one token."""
        ...

    def chunk_attention_s(self, num_new: int, num_prefix: int) -> float:
        """Attention of one request's num_new > 1 tokens over num_prefix cached tokens and themselves."""
        ...

    def decode_attention_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        """Attention of a step's one-token chunks, whose prefixes sum to num_prefix_tokens, the longest
        being max_prefix (a kernel may balance an uneven batch badly)."""
        ...

    def decode_step_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        """A whole step of one-token chunks only."""
        ...


class Roofline:
    """StepCosts from the device's nominal rates: each part takes max(FLOPs / rate, bytes / bandwidth)."""

    measured_tp = 1

    def __init__(self, model: ModelConfig, device: DeviceSpec, tp: int = 1):
        self.device = device
        b = device.dtype_bytes
        self._flops_per_s = device.peak_flops * device.flops_efficiency
        self._bytes_per_s = device.hbm_bytes_per_s * device.bandwidth_efficiency
        self._linear_flops = 2.0 * model.num_params_non_embedding / tp  # per token
        head_params = model.vocab_size * model.hidden_size / tp
        self._weight_bytes = (model.num_params_non_embedding / tp + head_params) * b
        self._head_flops = 2.0 * head_params  # per sampled sequence
        heads = model.num_heads / tp
        kv_heads = max(1.0, model.num_kv_heads / tp)  # replicated when tp > kv heads
        self._qk_flops = 4.0 * model.num_layers * heads * model.head_dim  # per (query, key) pair
        self._kv_bytes = 2.0 * model.num_layers * kv_heads * model.head_dim * b  # per cached token

    def base_s(self, num_tokens: int, num_seqs: int, num_decodes: int = 0) -> float:
        flops = self._linear_flops * num_tokens + self._head_flops * num_seqs
        return self.device.step_overhead_s + max(flops / self._flops_per_s, self._weight_bytes / self._bytes_per_s)

    def chunk_attention_s(self, num_new: int, num_prefix: int) -> float:
        pairs = num_new * (num_prefix + (num_new + 1) / 2)  # the causal part sees half the chunk
        return self._attention_s(pairs, num_prefix + num_new)

    def decode_attention_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        return self._attention_s(num_prefix_tokens + num_decodes, num_prefix_tokens + num_decodes)

    def decode_step_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        return self.base_s(num_decodes, num_decodes) + self.decode_attention_s(num_decodes, num_prefix_tokens, 0)

    def _attention_s(self, num_pairs: float, num_kv_tokens: float) -> float:
        return max(self._qk_flops * num_pairs / self._flops_per_s, self._kv_bytes * num_kv_tokens / self._bytes_per_s)


@dataclass(frozen=True)
class Profile:
    """Step-time tables measured by `mnemosyne profile` on one device, for one model. Decode tables
    are indexed by (number of one-token chunks, the sum of their prefixes): the decode kernel's time
    is close to linear in the KV it reads."""

    model: str
    device_name: str
    dtype: str
    tp: int
    linear_num_tokens: tuple[int, ...]
    linear_s: tuple[float, ...]
    """Step time with attention left out, one request of linear_num_tokens[i] tokens."""
    per_seq_s: float
    """Extra non-attention time per additional request in a step (metadata, sampling)."""
    chunk_num_new: tuple[int, ...]
    chunk_num_prefix: tuple[int, ...]
    chunk_s: tuple[tuple[float, ...], ...]
    """[len(chunk_num_new)][len(chunk_num_prefix)] attention time of one chunk."""
    decode_num_decodes: tuple[int, ...]
    decode_prefix_tokens: tuple[int, ...]
    decode_attention_s: tuple[tuple[float, ...], ...]
    """[len(decode_num_decodes)][len(decode_prefix_tokens)] decodes' attention inside a mixed step."""
    decode_step_s: tuple[tuple[float, ...], ...]
    """[same] time of a step of decodes only."""
    skewed_attention_s: tuple[tuple[float, ...], ...] = ()
    """[same] as decode_attention_s, with all the prefix tokens in one request (empty: not measured)."""
    skewed_step_s: tuple[tuple[float, ...], ...] = ()
    """[same] as decode_step_s, with all the prefix tokens in one request."""
    decode_graph_buckets: tuple[int, ...] = ()
    """Batch sizes of the CUDA graphs that ran the decode-only steps (empty: eager). Such a step runs
    its batch padded to the next bucket, so its time is read off the tables there."""
    uneven_attention_s: tuple[tuple[float, ...], ...] = ()
    """[same] as decode_attention_s, the prefix tokens spread as `uneven_prefixes` (empty: not measured)."""
    uneven_step_s: tuple[tuple[float, ...], ...] = ()
    """[same] as decode_step_s, spread as `uneven_prefixes`."""
    check_ratios: tuple[float, ...] = ()
    """measured / predicted of the held-out batches with a prefill chunk that `profile --check` timed
    (read from its saved report; empty: not checked): the feedback's factor before a run has its own."""
    num_sms: int = 0
    """The GPU's streaming multiprocessors (0: not recorded, a CPU profile or one from before), with the
    model's heads and the Triton split below: which chunks ran on cuDNN, whose cost steps by whole
    waves of query tiles (attention/routing.py), so that a chunk is read off the table where its
    waves are."""
    num_q_heads: int = 0
    num_kv_heads: int = 0
    triton_chunk_rows: int = 0
    """The GPU backend's split when measured (EngineConfig.chunk_rows_to_triton)."""

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        Path(path).write_text(json.dumps({"version": 3, **asdict(self), **(extra or {})}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--latency-profile {str(path)!r} cannot be read: {e}") from e
        known = {f.name for f in fields(cls)}
        check = raw.get("check") if isinstance(raw, dict) else None
        if isinstance(check, dict) and not raw.get("check_ratios"):
            raw["check_ratios"] = [b["measured_s"] / b["predicted_s"] for b in check.get("batches", ())
                                   if b.get("kind") != "decode" and b.get("predicted_s", 0) > 0]
        try:
            return cls(**{k: _tuples(v) for k, v in raw.items() if k in known})
        except TypeError as e:
            raise ValueError(f"--latency-profile {str(path)!r} is not a profile: {e}") from e


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class Profiled:
    """StepCosts interpolated from a Profile: piecewise linear, flat below the first grid point and
    extrapolated along the last segment above the last one. A profile taken at another
    tensor-parallel size is scaled by the ratio of the sizes."""

    def __init__(self, profile: Profile, tp: int = 1):
        self.profile = profile
        self.measured_tp = profile.tp
        self._scale = profile.tp / tp
        self._q_heads = profile.num_q_heads * profile.tp // tp
        """Query heads per rank at this tp: cuDNN's programs per query tile."""

    def base_s(self, num_tokens: int, num_seqs: int, num_decodes: int = 0) -> float:
        # per_seq_s is the cost of one more multi-token chunk (measured as 8 chunks against one of the
        # same total): each gets its own prefix runs and attention call. Decodes share one kernel, and
        # what each costs beyond its token is in the decode tables (timed beside a chunk, both ways).
        p = self.profile
        return (self._scale * interp(p.linear_num_tokens, p.linear_s, num_tokens)
                + p.per_seq_s * max(0, num_seqs - num_decodes - 1))

    def chunk_attention_s(self, num_new: int, num_prefix: int) -> float:
        p = self.profile
        return self._scale * _interp2(p.chunk_num_new, p.chunk_num_prefix, p.chunk_s,
                                      self.cost_tokens(num_new, num_prefix), num_prefix)

    def cost_tokens(self, num_new: int, num_prefix: int) -> int:
        """Where a chunk's time is read off the table: a chunk that goes to cuDNN pays for whole waves
        of query tiles, so 600 tokens cost what 1024 do on an H200; interpolated between the rows at
        512 and 1024 instead, call71-73's 544-736-token chunks over 24-30K ran at 1.2-1.8x their
        prediction, and the largest chunk within a budget tends to be just such a chunk. Rows at
        multiples of the wave (the GPU grid's) are measured whole waves."""
        p = self.profile
        if not (p.num_sms and p.num_q_heads and p.num_kv_heads) or routes_to_triton(
                num_new, p.num_q_heads // p.num_kv_heads, num_prefix, p.triton_chunk_rows):
            return num_new
        return cudnn_cost_tokens(num_new, self._q_heads, p.num_sms)

    def decode_attention_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        p = self.profile
        return self._decode_s(p.decode_attention_s, p.uneven_attention_s, p.skewed_attention_s, num_decodes,
                              num_decodes, num_prefix_tokens, max_prefix)

    def decode_step_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        p = self.profile
        padded = next((b for b in p.decode_graph_buckets if b >= num_decodes), num_decodes)
        return self._decode_s(p.decode_step_s, p.uneven_step_s, p.skewed_step_s, padded, num_decodes,
                              num_prefix_tokens, max_prefix)

    def _decode_s(self, even: Sequence[Sequence[float]], uneven: Sequence[Sequence[float]],
                  skewed: Sequence[Sequence[float]], rows: int, num_decodes: int, num_prefix_tokens: int,
                  max_prefix: int) -> float:
        """The tables at `rows` (the batch, or its graph's padded size) and the batch's KV, read at its
        imbalance: the longest prefix over the mean, 1 for an even batch, `uneven_imbalance` for the
        uneven table's spread, num_decodes with every token in one request (the skewed table at the
        whole KV), interpolated in log(imbalance) between them. Never less than the longest request
        alone (the skewed table at max_prefix)."""
        p = self.profile

        def at(table: Sequence[Sequence[float]], kv: int) -> float:
            return _interp2(p.decode_num_decodes, p.decode_prefix_tokens, table, rows, kv)

        t = at(even, num_prefix_tokens)
        if uneven and num_decodes > 1 and num_prefix_tokens > 0:
            imbalance = max(1.0, max_prefix * num_decodes / num_prefix_tokens)
            knee = uneven_imbalance(num_decodes)
            if imbalance <= knee:
                t += (at(uneven, num_prefix_tokens) - t) * math.log(imbalance) / math.log(knee)
            else:
                t = at(uneven, num_prefix_tokens)
                if skewed and num_decodes > knee:
                    share = min(1.0, math.log(imbalance / knee) / math.log(num_decodes / knee))
                    t += (at(skewed, num_prefix_tokens) - t) * share
        if skewed:
            t = max(t, at(skewed, max_prefix))
        return self._scale * t


@functools.cache
def _uneven_weights(num_decodes: int) -> tuple[float, ...]:
    return tuple(((i + 0.5) / num_decodes) ** 3 for i in range(num_decodes))


def uneven_prefixes(num_decodes: int, total: int) -> list[int]:
    """The uneven decode batch the profile times: prefixes in proportion to ((i + 1/2) / n)^3, a few
    long contexts among many short ones, as in serving."""
    weights = _uneven_weights(num_decodes)
    scale = total / sum(weights)
    return [int(w * scale) for w in weights]


@functools.cache
def uneven_imbalance(num_decodes: int) -> float:
    """Longest prefix over the mean in `uneven_prefixes` (about 4 for large batches). Cached: every
    prediction of a step with decodes reads it, inside the chunking's binary search."""
    weights = _uneven_weights(num_decodes)
    return max(1.0 + 1e-9, weights[-1] * num_decodes / sum(weights))


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs increasing; flat below xs[0], the last slope above xs[-1]."""
    if x <= xs[0] or len(xs) == 1:
        return max(0.0, ys[0])
    i = min(bisect.bisect_right(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _interp2(xs: Sequence[float], ys: Sequence[float], table: Sequence[Sequence[float]], x: float, y: float) -> float:
    """Bilinear version of _interp over table[i][j] at (xs[i], ys[j])."""
    return interp(xs, [interp(ys, row, y) for row in table], x)


@dataclass(frozen=True)
class CommCosts:
    """Collective time a step adds to its StepCosts, each term affine in the step's new tokens."""

    tp_fixed_s: float = 0.0
    """TP all-reduces of one step (every layer), latency part."""
    tp_per_token_s: float = 0.0
    """TP all-reduces, per new token."""
    hop_fixed_s: float = 0.0
    """Point-to-point sends between pipeline stages (all pp - 1 of them), latency part."""
    hop_per_token_s: float = 0.0
    """Stage-to-stage sends, per new token."""
    merge_fixed_s: float = 0.0
    """KVP (out, LSE) gathers of one step (every layer), in a step with a multi-group request."""
    merge_per_token_s: float = 0.0
    """KVP gathers, per new token of a multi-group request."""


def tp_sum_bytes(dtype_bytes: int) -> float:
    """Bytes per element of a row-parallel sum, in all-reduce terms: `Group.sum_rounded` reduce-scatters
    float32 and all-gathers the model dtype, each half an all-reduce's traffic (3 for bf16)."""
    return (4 + dtype_bytes) / 2


def flat_comm_costs(model: ModelConfig, device: DeviceSpec, layout: Layout, measured_tp: int = 1) -> CommCosts:
    """The default CommCosts: every TP and PP transfer on the device's link, KVP merges on its network.
    TP all-reduces are left out when the costs were measured at this tp (they include them)."""
    b, tp, lat = device.dtype_bytes, layout.tp, device.collective_latency_s
    needs_tp = tp > 1 and measured_tp != tp
    # Two sums of [tokens, hidden] per layer; a ring moves 2(tp-1)/tp of an all-reduce's bytes. Row-parallel
    # layers sum float32 partials and round once (comm.Group.sum_rounded): for a step of any size
    # a float32 reduce-scatter plus a bf16 all-gather, 3 bytes an element in all-reduce terms.
    return CommCosts(
        tp_fixed_s=2 * model.num_layers * lat if needs_tp else 0.0,
        tp_per_token_s=(2 * model.num_layers * 2 * (tp - 1) / tp * model.hidden_size * tp_sum_bytes(b)
                        / device.link_bytes_per_s if needs_tp else 0.0),
        hop_fixed_s=(layout.pp - 1) * lat,
        hop_per_token_s=(layout.pp - 1) * model.hidden_size * b / device.link_bytes_per_s,
        # Every group's partial out and LSE per layer, gathered over the network.
        merge_fixed_s=model.num_layers * lat,
        merge_per_token_s=model.num_layers * model.num_heads / tp * (model.head_dim * b + 4) / device.network_bytes_per_s,
    )


class LatencyModel:
    """Predicted step time for a layout. Adds what the costs leave out: TP all-reduces (roofline, or a
    profile taken at another TP size), pipeline hops, and KVP: a request's attention runs on its KV
    shard of at most kvp_group_max_tokens, in parallel across groups, then an LSE merge. `comm`
    replaces the flat collective costs of `device` (the planner's interconnect model supplies it)."""

    WORK_CHUNK = 512
    """Nominal chunk for predicting a whole prefill's work (ranking and deadlines)."""
    _WORK_GRID = (0, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)

    def __init__(self, costs: StepCosts, model: ModelConfig, device: DeviceSpec, layout: Layout = Layout(),
                 comm: CommCosts | None = None):
        self.costs = costs
        self.layout = layout
        self.comm = comm or flat_comm_costs(model, device, layout, costs.measured_tp)
        self._comm_fixed_s = self.comm.tp_fixed_s + self.comm.hop_fixed_s
        self._comm_per_token_s = self.comm.tp_per_token_s + self.comm.hop_per_token_s
        self._merge_fixed_s = self.comm.merge_fixed_s
        self._merge_per_token_s = self.comm.merge_per_token_s
        self._group_tokens = layout.kvp_group_max_tokens if layout.kvp > 1 else None
        self._work_cum: list[float] = []
        self._work_rate: list[float] = []

    def shard_prefix(self, num_prefix: int) -> int:
        """Prefix tokens the busiest KVP group attends over: a full group's at most."""
        group = self._group_tokens
        return num_prefix if group is None else min(num_prefix, group)

    def estimate(self) -> StepEstimate:
        return StepEstimate(self)

    def step_time_s(self, chunks: Iterable[tuple[int, int]]) -> float:
        """Predicted time of a step of (num_new_tokens, num_prefix_tokens) per request."""
        est = self.estimate()
        for num_new, num_prefix in chunks:
            est.add(num_new, num_prefix)
        return est.time_s

    def prefill_work_s(self, start: int, end: int) -> float:
        """Predicted time to compute tokens [start, end) of one request alone, in nominal chunks."""
        if end <= start:
            return 0.0
        return self._cumulative_work_s(end) - self._cumulative_work_s(start)

    def _cumulative_work_s(self, x: int) -> float:
        # The per-token cost is piecewise linear in the prefix between grid points, so its integral
        # is exact per segment: O(log) per query, whatever the length.
        grid = self._WORK_GRID
        if not self._work_cum:
            c = self.WORK_CHUNK
            self._work_rate = [self.step_time_s([(c, p)]) / c for p in grid]
            self._work_cum = [0.0]
            for i in range(1, len(grid)):
                mean_rate = (self._work_rate[i - 1] + self._work_rate[i]) / 2
                self._work_cum.append(self._work_cum[-1] + (grid[i] - grid[i - 1]) * mean_rate)
        rate = self._work_rate
        i = min(bisect.bisect_right(grid, x), len(grid) - 1)
        x0, x1 = grid[i - 1], grid[i]
        r = rate[i - 1] + (rate[i] - rate[i - 1]) * (x - x0) / (x1 - x0)
        return self._work_cum[i - 1] + (x - x0) * (rate[i - 1] + r) / 2


class StepEstimate:
    """Predicted time of a step being built, one request at a time; O(1) per add or query."""

    __slots__ = ("chunk_attention_s", "decode_max_prefix", "decode_prefix_tokens", "model", "num_decodes",
                 "num_merge_tokens", "num_seqs", "num_tokens")

    def __init__(self, model: LatencyModel):
        self.model = model
        self.num_tokens = 0
        self.num_seqs = 0
        self.chunk_attention_s = 0.0
        self.num_decodes = 0
        self.decode_prefix_tokens = 0
        self.decode_max_prefix = 0
        self.num_merge_tokens = 0
        """New tokens of requests whose KV spans several KVP groups (merged by LSE)."""

    @property
    def time_s(self) -> float:
        return self._time_s(self.chunk_attention_s, self.num_tokens, self.num_seqs, self.num_decodes,
                            self.decode_prefix_tokens, self.decode_max_prefix, self.num_merge_tokens)

    def time_with_s(self, num_new: int, num_prefix: int) -> float:
        """The step's time if one more request with these counts joined it."""
        shard = self.model.shard_prefix(num_prefix)
        merge = self.num_merge_tokens + (num_new if shard < num_prefix else 0)
        if num_new == 1:
            return self._time_s(self.chunk_attention_s, self.num_tokens + 1, self.num_seqs + 1, self.num_decodes + 1,
                                self.decode_prefix_tokens + shard, max(self.decode_max_prefix, shard), merge)
        return self._time_s(self.chunk_attention_s + self.model.costs.chunk_attention_s(num_new, shard),
                            self.num_tokens + num_new, self.num_seqs + 1, self.num_decodes,
                            self.decode_prefix_tokens, self.decode_max_prefix, merge)

    def add(self, num_new: int, num_prefix: int) -> None:
        shard = self.model.shard_prefix(num_prefix)
        if shard < num_prefix:
            self.num_merge_tokens += num_new
        if num_new == 1:
            self.num_decodes += 1
            self.decode_prefix_tokens += shard
            self.decode_max_prefix = max(self.decode_max_prefix, shard)
        else:
            self.chunk_attention_s += self.model.costs.chunk_attention_s(num_new, shard)
        self.num_tokens += num_new
        self.num_seqs += 1

    def _time_s(self, chunk_attention_s: float, num_tokens: int, num_seqs: int, num_decodes: int,
                decode_prefix_tokens: int, decode_max_prefix: int, num_merge_tokens: int) -> float:
        if num_seqs == 0:
            return 0.0
        m, costs = self.model, self.model.costs
        if num_decodes == num_seqs:
            t = costs.decode_step_s(num_decodes, decode_prefix_tokens, decode_max_prefix)
        else:
            t = costs.base_s(num_tokens, num_seqs, num_decodes) + chunk_attention_s
            if num_decodes:
                t += costs.decode_attention_s(num_decodes, decode_prefix_tokens, decode_max_prefix)
        t += m._comm_fixed_s + m._comm_per_token_s * num_tokens
        if num_merge_tokens:
            t += m._merge_fixed_s + m._merge_per_token_s * num_merge_tokens
        return t


def build_latency_model(model: ModelConfig, layout: Layout, device: str | DeviceSpec = "h100",
                        profile: str | Path | Profile | None = None, comm: CommCosts | None = None) -> LatencyModel:
    """A profiled model when a profile (or its path) is given, else the roofline of `device` (a DEVICES
    key, or a spec); `comm` replaces the device's flat collective costs."""
    spec = device if isinstance(device, DeviceSpec) else device_spec(device)
    if not profile:
        costs: StepCosts = Roofline(model, spec, layout.tp)
    else:
        costs = Profiled(profile if isinstance(profile, Profile) else Profile.load(profile), layout.tp)
    return LatencyModel(costs, model, spec, layout, comm)
