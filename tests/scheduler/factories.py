"""Shared factories for scheduler tests: a fake clock, a synthetic step-time model, requests."""

from __future__ import annotations

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.plan import StepPlan, StepResult
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.chunking import Chunking
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, Layout
from mnemosyne.scheduler.policy import FCFS, Policy
from mnemosyne.scheduler.scheduler import GroupBoundary, Scheduler, SchedulerLimits


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class SyntheticCosts:
    """1 ms a step, 10 µs a token, and attention of 10 ns per (query, key) pair: late chunks of a long
    prompt are attention-bound, short prompts linear-bound."""

    measured_tp = 1

    def base_s(self, num_tokens: int, num_seqs: int, num_decodes: int = 0) -> float:
        return 1e-3 + 1e-5 * num_tokens

    def chunk_attention_s(self, num_new: int, num_prefix: int) -> float:
        return 1e-8 * num_new * (num_prefix + num_new / 2)

    def decode_attention_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        return 1e-8 * (num_prefix_tokens + num_decodes)

    def decode_step_s(self, num_decodes: int, num_prefix_tokens: int, max_prefix: int) -> float:
        return self.base_s(num_decodes, num_decodes) + self.decode_attention_s(num_decodes, num_prefix_tokens, 0)


def synthetic_model(layout: Layout | None = None) -> LatencyModel:
    return LatencyModel(SyntheticCosts(), PRESETS["tiny"], DEVICES["cpu"], layout or Layout())


def make_scheduler(policy: Policy | None = None, chunking: Chunking | None = None, num_blocks: int = 1 << 16,
                   block_size: int = 16, budget: int = 1 << 20, max_seqs: int = 64, max_len: int = 1 << 22,
                   group_boundary: GroupBoundary | None = None) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    sched = Scheduler(SchedulerLimits(budget, max_seqs, max_len), BlockPool(num_blocks, block_size),
                      policy or FCFS(), clock, chunking, group_boundary)
    return sched, clock


def add(sched: Scheduler, rid: str, prompt_len: int, arrival_s: float, max_tokens: int = 8,
        deadline_s: float | None = None) -> Request:
    req = Request(rid, [3] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                  arrival_s=arrival_s, deadline_s=deadline_s)
    sched.add_request(req, seed=0)
    return req


def land(sched: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """Land a step as a worker would: every chunk that reaches its request's last token samples."""
    sampled = [c.request_id for c in plan.chunks
               if c.start + c.num_new_tokens == sched.requests[c.request_id].num_tokens]
    sched.update(plan, StepResult(plan.step_id, tuple(sampled), (token,) * len(sampled), (None,) * len(sampled)))


def shapes(plan: StepPlan) -> list[tuple[int, int]]:
    """(num_new_tokens, num_prefix_tokens) of each chunk, as the latency model takes them."""
    return [(c.num_new_tokens, c.start) for c in plan.chunks]
