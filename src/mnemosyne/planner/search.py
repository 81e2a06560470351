"""The layout search: every (tp, pp, kvp) whose product is the GPU count, each with its KVP group size L
and step budgets, predicted, checked against memory and the SLOs, and ranked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.planner.hardware import Gpu
from mnemosyne.planner.interconnect import Interconnect
from mnemosyne.planner.predict import KV_MEMORY_FRACTION, Candidate, Prediction, group_tokens, predict
from mnemosyne.scheduler.latency_model import Layout, Profile

RANK_KEYS = ("ttft", "tbt", "energy")


@dataclass(frozen=True)
class Slos:
    ttft_s: float | None = None
    tbt_s: float | None = None
    """Holds for the request's own decode and for decodes batched with its prefill (the step budget)."""


@dataclass(frozen=True)
class Verdict:
    """A prediction and what rules it out, if anything."""

    prediction: Prediction
    reasons: tuple[str, ...]
    """Empty when the layout fits and meets every SLO."""

    @property
    def is_feasible(self) -> bool:
        return not self.reasons


def layouts(model: ModelConfig, num_gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every (tp, pp, kvp) with tp * pp * kvp == num_gpus that the engine can run: tp inside one node and
    dividing the heads (GQA: kv heads divisible by tp, or tp by kv heads), no more stages than layers."""
    found = []
    for tp in _divisors(num_gpus):
        if tp > gpus_per_node or model.num_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            continue
        for pp in _divisors(num_gpus // tp):
            if pp <= model.num_layers:
                found.append(Layout(tp, pp, num_gpus // (tp * pp)))
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model: ModelConfig, num_gpus: int, context: int, gpus_per_node: int,
               budgets_s: Sequence[float | None], chunking: str, max_num_batched_tokens: int) -> list[Candidate]:
    """Each layout with the smallest L that holds the context in its kvp groups (the busiest group's
    attention and KV are smallest then), once per step budget."""
    found = []
    for layout in layouts(model, num_gpus, gpus_per_node):
        sized = replace(layout, kvp_group_max_tokens=group_tokens(layout, context))
        found += [Candidate(sized, budget, chunking, max_num_batched_tokens) for budget in budgets_s]
    return found


def judge(prediction: Prediction, slos: Slos) -> Verdict:
    reasons = []
    m = prediction.memory
    if not m.fits:
        reasons.append(f"memory: needs {m.total / 2**30:.0f} GiB of {m.capacity / 2**30:.0f} "
                       f"(KV gets {KV_MEMORY_FRACTION:.0%} of what is left)")
    if slos.ttft_s is not None and prediction.ttft_s > slos.ttft_s:
        reasons.append(f"TTFT {prediction.ttft_s:.1f}s > {slos.ttft_s:g}s")
    if slos.tbt_s is not None:
        if prediction.tbt_s > slos.tbt_s:
            reasons.append(f"TBT {prediction.tbt_s * 1e3:.1f}ms > {slos.tbt_s * 1e3:g}ms")
        if prediction.max_step_s > slos.tbt_s:
            reasons.append(f"prefill step {prediction.max_step_s * 1e3:.0f}ms > {slos.tbt_s * 1e3:g}ms")
    return Verdict(prediction, tuple(reasons))


def rank(verdicts: Sequence[Verdict], by: str = "ttft") -> list[Verdict]:
    """Feasible first; then by the chosen figure, the others breaking ties."""
    if by not in RANK_KEYS:
        raise ValueError(f"--rank-by must be one of {', '.join(RANK_KEYS)}, got {by!r}")

    def key(v: Verdict) -> tuple:
        p = v.prediction
        figures = {"ttft": p.ttft_s, "tbt": p.tbt_s, "energy": p.prefill_j_per_token}
        return (not v.prediction.memory.fits, not v.is_feasible, figures[by], p.ttft_s, p.tbt_s)

    return sorted(verdicts, key=key)


@dataclass(frozen=True)
class Search:
    """What is being planned: the model, the hardware, the request and its SLOs."""

    model: ModelConfig
    gpu: Gpu
    net: Interconnect
    context: int
    slos: Slos = Slos()
    budgets_s: tuple[float | None, ...] = (None,)
    chunking: str = "adaptive"
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    profile: Profile | None = None
    sequence_pipelining: bool = True

    def run(self, num_gpus: int, by: str = "ttft") -> list[Verdict]:
        """Every candidate on num_gpus GPUs, ranked."""
        found = candidates(self.model, num_gpus, self.context, self.net.gpus_per_node, self.budgets_s,
                           self.chunking, self.max_num_batched_tokens)
        if not found:
            raise ValueError(f"no (tp, pp, kvp) layout of {num_gpus} GPUs suits this model")
        return rank([judge(predict(self.model, self.gpu, self.net, c, self.context, self.profile,
                                   self.sequence_pipelining), self.slos) for c in found], by)


def best_per_count(search: Search, counts: Sequence[int], by: str = "ttft") -> dict[int, Verdict | None]:
    """The top feasible layout on each GPU count; None where no layout fits and meets the SLOs."""
    best: dict[int, Verdict | None] = {}
    for n in counts:
        ranked = search.run(n, by)
        best[n] = ranked[0] if ranked[0].is_feasible else None
    return best
