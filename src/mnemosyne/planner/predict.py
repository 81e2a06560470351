"""Predictions for one layout and one long request: TTFT of its prefill through sequence pipeline
parallelism, TBT of its decode at the full context, memory per GPU, and energy per token.

Chunk sizes come from the engine's own chunking policy over the step-time model, so they start large
and shrink as the prefix grows, exactly as `mnemosyne serve` would cut them. A prefill's chunks form
runs of equal size (at most token cap / 32 of them, plus one per KVP group boundary); each run is
found with a binary search and summed in closed form, so a 10M-token prefill costs milliseconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from mnemosyne.bench.floors import prefill_flops
from mnemosyne.config import EngineConfig, ModelConfig, default_pipeline_depth
from mnemosyne.planner.hardware import Gpu
from mnemosyne.planner.interconnect import Interconnect, comm_costs
from mnemosyne.scheduler.chunking import GRANULARITY, Chunking, make_chunking
from mnemosyne.scheduler.latency_model import LatencyModel, Layout, Profile, build_latency_model

RESERVED_BYTES = 2 * 2**30
"""Per GPU, outside weights, KV and activations: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers."""
KV_MEMORY_FRACTION = 0.9
"""The engine gives the KV cache this share of the memory left (--kv-cache-memory-fraction)."""
_SAMPLES_PER_RUN = 16


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a layout and how its prefill is chunked."""

    layout: Layout
    step_budget_s: float | None = None
    """Adaptive chunking's budget for a whole step (every stage); None: chunks are the token cap."""
    chunking: str = "adaptive"
    """adaptive, or fixed:N."""
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    """Token cap of a step: the largest chunk, and the activation memory."""

    @property
    def num_gpus(self) -> int:
        return self.layout.tp * self.layout.pp * self.layout.kvp


@dataclass(frozen=True)
class Memory:
    """Bytes on the fullest GPU of the layout."""

    weights: float
    kv: float
    """The request's KV shard: a full group's (at most kvp_group_max_tokens), on the deepest stage."""
    activations: float
    """One step of the token cap: hidden states, QKV, MLP, attention partials, the KVP gather."""
    reserved: float
    capacity: float
    """The device's memory."""

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations + self.reserved

    @property
    def fits(self) -> bool:
        """The KV shard fits in the engine's KV cache: a fraction of the memory left after the rest."""
        left = self.capacity - self.weights - self.activations - self.reserved
        return self.kv <= KV_MEMORY_FRACTION * left


@dataclass(frozen=True)
class Prediction:
    """Predicted figures of one candidate for a request of `context` tokens (alone on the GPUs)."""

    candidate: Candidate
    context: int
    ttft_s: float
    """Prefill of the whole context: with sequence pipelining unless predicted without."""
    ttft_no_spp_s: float
    """The same chunks through ordinary pipeline parallelism (each waits for the last stage)."""
    tbt_s: float
    """One decode step at the full context (batch of one)."""
    max_step_s: float
    """Longest prefill step through every stage: what decodes batched with this prefill would see."""
    num_chunks: int
    memory: Memory
    prefill_j_per_token: float
    decode_j_per_token: float
    prefill_mfu: float
    """Prefill FLOP floor over TTFT × GPUs × nominal peak."""


@dataclass(frozen=True)
class _Run:
    start: int
    num_new: int
    num_chunks: int


def latency_model(model: ModelConfig, gpu: Gpu, net: Interconnect, layout: Layout,
                  profile: Profile | None = None) -> LatencyModel:
    """The engine's step-time model for this layout, with collectives from the interconnect model."""
    measured_tp = profile.tp if profile is not None else 1
    comm = comm_costs(model, layout, net, gpu.device.dtype_bytes, measured_tp)
    return build_latency_model(model, layout, gpu.device, profile, comm)


def group_tokens(layout: Layout, context: int, block_size: int = 16) -> int | None:
    """The smallest kvp_group_max_tokens that spreads `context` over every KVP group (block-aligned)."""
    if layout.kvp == 1:
        return None
    per_group = -(-context // layout.kvp)
    return -(-per_group // block_size) * block_size


def predict(model: ModelConfig, gpu: Gpu, net: Interconnect, candidate: Candidate, context: int,
            profile: Profile | None = None, sequence_pipelining: bool = True) -> Prediction:
    """Every figure of one candidate; the layout's kvp_group_max_tokens must hold `context` in kvp groups."""
    layout = candidate.layout
    group = layout.kvp_group_max_tokens if layout.kvp > 1 else None
    if group is not None and -(-context // group) > layout.kvp:
        raise ValueError(f"{context} tokens need {-(-context // group)} KVP groups of {group}, "
                         f"the layout has {layout.kvp}")
    lm = latency_model(model, gpu, net, layout, profile)
    prefill = _prefill(lm, candidate, context, group, sequence_pipelining, gpu.stage_dispatch_s)
    eager = layout.pp > 1 or (group is not None and context > group)  # no CUDA graph for these steps
    tbt_s = lm.step_time_s([(1, context)]) + (gpu.eager_layer_s * model.num_layers if eager else 0.0)
    n, p = candidate.num_gpus, gpu.power
    decode_busy = layout.tp * layout.kvp * tbt_s  # each stage works 1/pp of the step
    decode_j = decode_busy * p.decode_w + (n * tbt_s - decode_busy) * p.idle_w
    prefill_j = prefill.busy_gpu_s * p.prefill_w + max(0.0, n * prefill.ttft_s - prefill.busy_gpu_s) * p.idle_w
    mfu = prefill_flops(model, context) / (prefill.ttft_s * n * gpu.device.peak_flops)
    return Prediction(candidate, context, prefill.ttft_s, prefill.ttft_no_spp_s, tbt_s, prefill.max_step_s,
                      prefill.num_chunks, memory(model, gpu, candidate, context), prefill_j / context, decode_j,
                      mfu)


@dataclass(frozen=True)
class _Prefill:
    ttft_s: float
    ttft_no_spp_s: float
    max_step_s: float
    num_chunks: int
    busy_gpu_s: float


def _prefill(lm: LatencyModel, candidate: Candidate, context: int, group: int | None,
             sequence_pipelining: bool, dispatch_s: float) -> _Prefill:
    """With SPP, chunk i takes the same t_i on every stage: a proportionate flow shop, whose last chunk
    leaves the last stage after sum(t_i) + (pp - 1) max(t_i) when buffers are unlimited. The engine adds
    three things. Stage 0 waits a dispatch for each plan. At most D micro-batches are in flight (the
    engine's default pipeline depth, pp), so stage 0 may also wait for the oldest to cross every stage
    and hop; and for the same reason a short chunk between longer ones (a remainder before a KVP group
    boundary) may cost as much as its neighbours, up to pp - 1 - (D - pp) chunks of it (none from
    D = 2 pp - 1 on). Without SPP: sum(pp t_i + hops_i). Tests check this against an explicit chunk-by-chunk
    simulation of the pipeline."""
    layout = candidate.layout
    pp, comm = layout.pp, lm.comm
    depth = default_pipeline_depth(pp)
    sum_period = sum_step = busy = max_step = last_hops_s = 0.0
    stages: list[tuple[float, float, int]] = []  # per run: first and last chunk's stage time, chunks
    for run in chunk_runs(lm, candidate, context, group, sequence_pipelining, dispatch_s):
        hops_s = comm.hop_fixed_s + comm.hop_per_token_s * run.num_new  # all pp - 1 of them
        active = 1 if group is None else min(layout.kvp, run.start // group + 1)
        steps = _sampled_steps(lm, run)
        total = _trapezoid_sum(steps, run.num_chunks)
        compute_s = total - run.num_chunks * hops_s  # every stage in turn
        sum_step += total
        first, last = (steps[0][1] - hops_s) / pp, (steps[-1][1] - hops_s) / pp
        # Over D chunks stage 0 either chains (t + dispatch each) or waits for the oldest to cross every
        # stage (pp t_oldest + hops): per chunk, (pp t_oldest + hops) / D - t of waiting, where growing
        # chunk times leave the oldest shorter than the mean.
        slope = (last - first) / max(1, run.num_chunks - 1)
        oldest = (first + last) / 2 - slope * (depth - 1) / 2
        wait_s = (pp * oldest + hops_s) / depth - (first + last) / 2
        sum_period += compute_s / pp + run.num_chunks * max(dispatch_s, wait_s)
        stages.append((first, last, run.num_chunks))
        max_step = max(max_step, steps[0][1], steps[-1][1])
        busy += compute_s * layout.tp * active  # each stage of each active group works 1/pp of it
        last_hops_s = hops_s
    if not sequence_pipelining or pp == 1:
        ttft_s = sum_step
    else:
        costly = pp - 1 - (depth - pp)  # valley chunks that wait on their neighbours
        valleys = sum(min(n, costly) * max(0.0, min(before[1], after[0]) - max(first, last))
                      for before, (first, last, n), after in zip(stages, stages[1:], stages[2:], strict=False)) \
            if costly > 0 else 0.0
        max_stage = max(max(first, last) for first, last, _ in stages)
        ttft_s = sum_period + valleys + (pp - 1) * max_stage + last_hops_s
    return _Prefill(ttft_s, sum_step, max_step, sum(n for _, _, n in stages), busy)


def chunk_runs(lm: LatencyModel, candidate: Candidate, context: int, group: int | None,
               sequence_pipelining: bool = True, dispatch_s: float = 0.0) -> list[_Run]:
    """A lone request's chunks, as the engine's chunking policy cuts them: clipped at every KVP group
    boundary, grouped into runs of equal size. Within a boundary, the policy's chunk never grows with
    the prefix (the predicted time of a chunk only grows, and the work left only shrinks), so a run's
    end is found by binary search."""
    spp_stages = candidate.layout.pp if sequence_pipelining else 1
    chunking = make_chunking(candidate.chunking, lm, candidate.step_budget_s, candidate.max_num_batched_tokens,
                             spp_stages, dispatch_s)
    runs: list[_Run] = []
    start = 0
    while start < context:
        end = context if group is None else min(context, (start // group + 1) * group)
        left = end - start
        size = chunking.new_step().fit(start, left, 0.0)
        # The whole remainder fits when it is a run of this size with under GRANULARITY tokens over.
        count = left // size if left % size == 0 else max(1, (left - GRANULARITY) // size)
        if count > 1 and candidate.chunking in ("adaptive", "pipeline"):
            count = _run_length(chunking, start, left, size, count)
        runs.append(_Run(start, size, count))
        start += size * count
    return runs


def _run_length(chunking: Chunking, start: int, left: int, size: int, most: int) -> int:
    """How many chunks of `size` from `start` the policy keeps cutting (at most `most`): while it still
    gives that size to what is left."""
    def keeps(i: int) -> bool:
        return chunking.new_step().fit(start + i * size, left - i * size, 0.0) == size

    lo, hi = 1, most  # keeps(0): the policy chose `size` at `start`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keeps(mid - 1):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _sampled_steps(lm: LatencyModel, run: _Run) -> list[tuple[int, float]]:
    """(chunk index, predicted step time) at up to _SAMPLES_PER_RUN evenly spaced chunks of the run."""
    n = run.num_chunks
    idx = sorted({round(i * (n - 1) / (_SAMPLES_PER_RUN - 1)) for i in range(_SAMPLES_PER_RUN)}) if n > 1 else [0]
    return [(i, lm.step_time_s([(run.num_new, run.start + i * run.num_new)])) for i in idx]


def _trapezoid_sum(samples: list[tuple[int, float]], n: int) -> float:
    """Sum over i < n of a function known at sampled indices, linear between them (step time is piecewise
    linear in the prefix): exact at the samples, trapezoids in between."""
    if n == 1:
        return samples[0][1]
    total = samples[0][1]
    for (i0, y0), (i1, y1) in itertools.pairwise(samples):
        # indices i0 < i <= i1: (i1 - i0) points, the function linear between the samples
        k = i1 - i0
        total += k * y0 + (y1 - y0) * (k + 1) / 2
    return total


def memory(model: ModelConfig, gpu: Gpu, candidate: Candidate, context: int) -> Memory:
    """Bytes on the fullest GPU: the first or last stage (embedding, LM head) of ceil(layers / pp) layers."""
    layout, b = candidate.layout, gpu.device.dtype_bytes
    tp, hidden, head_dim = layout.tp, model.hidden_size, model.head_dim
    q_heads = model.num_heads / tp
    kv_heads = math.ceil(model.num_kv_heads / tp)  # replicated when tp > kv heads
    layers = math.ceil(model.num_layers / layout.pp)
    per_layer = (hidden * (q_heads + 2 * kv_heads) * head_dim + q_heads * head_dim * hidden
                 + 3 * hidden * model.intermediate_size / tp + 2 * hidden)
    vocab_rows = model.vocab_size / tp * hidden
    ends = 2 if layout.pp == 1 and not model.tie_word_embeddings else 1  # embedding and LM head together
    weights = (layers * per_layer + ends * vocab_rows + hidden) * b
    group = layout.kvp_group_max_tokens if layout.kvp > 1 else None
    kv_tokens = context if group is None else min(context, group)
    kv = kv_tokens * 2 * layers * kv_heads * head_dim * b
    t = candidate.max_num_batched_tokens
    per_token = (2 * hidden + (2 * q_heads + 2 * kv_heads) * head_dim + 3 * model.intermediate_size / tp) * b
    partials = q_heads * (head_dim + 1) * 4 * (2 + (layout.kvp if layout.kvp > 1 else 0))  # float32 (out, lse)
    activations = t * (per_token + partials)
    return Memory(weights, kv, activations, RESERVED_BYTES, gpu.device.memory_bytes)
