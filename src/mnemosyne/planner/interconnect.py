"""The interconnect model: NVLink inside a node, InfiniBand across nodes, and what the engine's
collectives cost on them for a layout: TP all-reduces, pipeline sends of each chunk's hidden states,
and the KVP (out, LSE) all-gather of every layer. Ranks follow the engine's `(kvp, pp, tp)` grid, tp
fastest, packed `gpus_per_node` to a node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnemosyne.config import ModelConfig
from mnemosyne.scheduler.latency_model import CommCosts, Layout, tp_sum_bytes


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU link rates. Defaults: an HGX H100/H200 node (NVLink 4 through NVSwitch, 450 GB/s per
    direction nominal) and one 400 Gb/s NDR InfiniBand rail per GPU."""

    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""
    nvlink_bytes_per_s: float = 350e9
    """Achieved per-GPU bandwidth inside a node, as NCCL's bus bandwidth reports it."""
    nvlink_latency_s: float = 20e-6
    """One small collective or send inside a node (NCCL launch and synchronisation included)."""
    ib_bytes_per_s: float = 45e9
    """Achieved per-GPU bandwidth between nodes: 90% of a 400 Gb/s rail."""
    ib_latency_s: float = 30e-6
    """One small collective or send that crosses nodes."""

    def __post_init__(self) -> None:
        if self.gpus_per_node <= 0:
            raise ValueError(f"--gpus-per-node must be positive, got {self.gpus_per_node}")
        if min(self.nvlink_bytes_per_s, self.ib_bytes_per_s) <= 0:
            raise ValueError("--nvlink-gbps and --ib-gbps must be positive")

    def link(self, ranks: Sequence[int]) -> tuple[float, float]:
        """(bytes/s, latency s) of the slowest link a group of ranks uses: NVLink when all share a node."""
        if len({r // self.gpus_per_node for r in ranks}) <= 1:
            return self.nvlink_bytes_per_s, self.nvlink_latency_s
        return self.ib_bytes_per_s, self.ib_latency_s

    def all_reduce_s(self, num_bytes: float, ranks: Sequence[int]) -> float:
        """Ring all-reduce of num_bytes on every rank: 2(n-1)/n of them cross each link."""
        n = len(ranks)
        if n <= 1:
            return 0.0
        bw, lat = self.link(ranks)
        return lat + 2 * (n - 1) / n * num_bytes / bw

    def all_gather_s(self, bytes_per_rank: float, ranks: Sequence[int]) -> float:
        """All-gather of bytes_per_rank from each rank: every rank receives n-1 parts."""
        n = len(ranks)
        if n <= 1:
            return 0.0
        bw, lat = self.link(ranks)
        return lat + (n - 1) * bytes_per_rank / bw

    def send_s(self, num_bytes: float, src: int, dst: int) -> float:
        bw, lat = self.link((src, dst))
        return lat + num_bytes / bw


def rank_of(layout: Layout, kvp_rank: int, pp_rank: int, tp_rank: int) -> int:
    """Global rank on the engine's grid: `(kvp, pp, tp)`, tp fastest (distributed/topology.py)."""
    return (kvp_rank * layout.pp + pp_rank) * layout.tp + tp_rank


def _affine(cost, groups) -> tuple[float, float]:
    """(fixed, per unit) of the costliest group for an affine cost(units, group): measured at 0 and 1."""
    worst = max(groups, key=lambda g: (cost(1.0, g), cost(0.0, g)))
    fixed = cost(0.0, worst)
    return fixed, cost(1.0, worst) - fixed


def comm_costs(model: ModelConfig, layout: Layout, net: Interconnect, dtype_bytes: int = 2,
               measured_tp: int = 1) -> CommCosts:
    """The step-time model's collective terms for `layout` on `net`, from the slowest group of each kind.
    Measured costs that already include TP (a profile taken at this tp) get no TP term."""
    tp, pp, kvp, b = layout.tp, layout.pp, layout.kvp, dtype_bytes
    tp_groups = [[rank_of(layout, k, s, t) for t in range(tp)] for k in range(kvp) for s in range(pp)]
    # Two sums of [tokens, hidden] per layer: float32 reduce-scatter plus all-gather (tp_sum_bytes).
    tp_fixed, tp_per_token = (0.0, 0.0) if tp == 1 or measured_tp == tp else _affine(
        lambda n, g: 2 * model.num_layers * net.all_reduce_s(n * model.hidden_size * tp_sum_bytes(b), g),
        tp_groups)
    # Each tp rank sends [2, tokens, hidden] (hidden and residual) to its peer in the next stage.
    replicas = list(range(kvp))
    hop_fixed, hop_per_token = (0.0, 0.0) if pp == 1 else _affine(
        lambda n, k: max(sum(net.send_s(n * 2 * model.hidden_size * b, rank_of(layout, k, s, t),
                                        rank_of(layout, k, s + 1, t)) for s in range(pp - 1))
                         for t in range(tp)), replicas)
    # attention/kvp.py: one all-gather per layer of [tokens, heads/tp, head_dim + 1] float32 per group.
    kvp_groups = [[rank_of(layout, k, s, t) for k in range(kvp)] for s in range(pp) for t in range(tp)]
    part_bytes = model.num_heads / tp * (model.head_dim + 1) * 4
    merge_fixed, merge_per_token = (0.0, 0.0) if kvp == 1 else _affine(
        lambda n, g: model.num_layers * net.all_gather_s(n * part_bytes, g), kvp_groups)
    return CommCosts(tp_fixed, tp_per_token, hop_fixed, hop_per_token, merge_fixed, merge_per_token)
