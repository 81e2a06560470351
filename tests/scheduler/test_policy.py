"""Policies on hand-worked examples: the paper's long-plus-two-shorts case, deadlines from SLOs,
work and per-request fields, and yielding in proportion to slack."""

from __future__ import annotations

import pytest

from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.policy import EDF, FCFS, LARS, LRS, Deadlines, PolicyContext, make_policy

TOKEN_S = 0.01
"""The examples' work: 10 ms a token, whatever the prefix."""


def work_s(start: int, end: int) -> float:
    return TOKEN_S * (end - start)


def request(rid: str, num_tokens: int, arrival_s: float, deadline_s: float | None = None, done: int = 0,
            priority: int = 0) -> Request:
    r = Request(rid, [3] * num_tokens, SamplingParams(), arrival_s=arrival_s, deadline_s=deadline_s,
                priority=priority)
    r.num_computed_tokens = done
    return r


def context(ttft_slo_s: float | None = None, rho_max: float = 0.5) -> PolicyContext:
    return PolicyContext(Deadlines(work_s, ttft_slo_s, work_factor=3.0), rho_max)


def paper_example() -> list[Request]:
    """A long request (10 s of work, 16 s deadline) that arrived at t=0 and has run 5 s, and two short
    ones (0.5 s of work, 1 s deadline each) arriving at t=5."""
    return [request("s1", 50, 5.0, deadline_s=1.0), request("s2", 50, 5.0, deadline_s=1.0),
            request("long", 1000, 0.0, deadline_s=16.0, done=500)]


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def test_paper_example_at_t5():
    # slack = arrival + deadline - now - remaining: long 0 + 16 - 5 - 5 = 6 s, shorts 5 + 1 - 5 - 0.5 = 0.5 s.
    # Relative to total work: long 6 / 10 = 0.6, shorts 0.5 / 0.5 = 1.0. LARS keeps the long request
    # (which has used more of its cushion for its size) first; EDF and LRS put the shorts first.
    reqs = paper_example()
    lars = LARS(context())
    assert lars.key(reqs[2], 5.0) == pytest.approx(0.6)
    assert lars.key(reqs[0], 5.0) == pytest.approx(1.0)
    assert ids(lars.order(reqs, 5.0)) == ["long", "s1", "s2"]
    assert ids(EDF(context()).order(reqs, 5.0)) == ["s1", "s2", "long"]
    assert ids(LRS(context()).order(reqs, 5.0)) == ["s1", "s2", "long"]
    assert ids(FCFS().order(reqs, 5.0)) == ["long", "s1", "s2"]
    # The long request does not take the whole step: with 6 s of slack over 5 s of work left it may
    # slow down by 6 / 11 and still make it, capped at rho_max: half the budget goes to the shorts.
    assert lars.yield_share(reqs[2], 5.0, reqs[0]) == pytest.approx(0.5)
    assert LARS(context(rho_max=0.4)).yield_share(reqs[2], 5.0, reqs[0]) == pytest.approx(0.4)


def test_paper_example_shorts_overtake_as_their_slack_burns():
    # At t=5.3 with no progress: shorts (6 - 5.3 - 0.5) / 0.5 = 0.4, long (16 - 5.3 - 5) / 10 = 0.57.
    reqs = paper_example()
    assert ids(LARS(context()).order(reqs, 5.3)) == ["s1", "s2", "long"]
    # A short request already late (t=6.2) yields nothing and sorts first by far: (-0.7) / 0.5.
    late = LARS(context())
    assert late.key(reqs[0], 6.2) == pytest.approx(-1.4)
    assert late.yield_share(reqs[0], 6.2, reqs[1]) == 0.0


@pytest.mark.parametrize("policy", [LARS, LRS, EDF])
def test_work_of_at_most_one_percent_rides_along_whatever_the_slack(policy):
    """A long request past its deadline yields nothing to work that would cost it more than 1% of its
    own (here 5%: the paper's shorts), but --rho-max to work of 1% or less, which it cannot miss."""
    long = request("long", 1000, 0.0, deadline_s=8.0, done=500)  # at t=5: 8 - 5 - 5 = -2 s of slack
    late = policy(context(rho_max=0.8))
    assert late.deadlines.slack_s(long, 5.0) < 0
    assert late.yield_share(long, 5.0, request("s", 50, 5.0, deadline_s=1.0)) == 0.0
    assert late.yield_share(long, 5.0, request("tiny", 10, 5.0, deadline_s=1.0)) == pytest.approx(0.8)
    # its remaining work is what counts: 90 tokens of a 100-token prompt cached are 10 tokens of work
    cached = request("cached", 100, 5.0, deadline_s=1.0)
    cached.num_cached_tokens = 90
    assert late.yield_share(long, 5.0, cached) == pytest.approx(0.8)
    assert FCFS().yield_share(long, 5.0, request("tiny", 10, 5.0)) == 0.0


def test_lars_does_not_starve_a_long_request_the_way_edf_does():
    # A stream of short requests, each arriving 0.2 s later with a 1 s deadline, against a long
    # request whose deadline is 3x its 10 s of work: EDF always picks a short one while any is
    # waiting; LARS picks the long one once its relative slack drops below the shorts'.
    long = request("long", 1000, 0.0)
    shorts = [request(f"s{i}", 20, 8.0 + 0.2 * i, deadline_s=1.0) for i in range(5)]
    now = 9.0
    assert ids(EDF(context()).order([long, *shorts], now))[0] == "s0"
    # long: (30 - 9 - 10) / 10 = 1.1; s0 (8 + 1 - 9 - 0.2) / 0.2 = -1: late shorts still come first,
    # but one with slack to spare (s4: (8.8 + 1 - 9 - 0.2) / 0.2 = 3) waits behind the long one.
    order = ids(LARS(context()).order([long, *shorts], now))
    assert order.index("s0") < order.index("long") < order.index("s4")


def test_deadlines_from_slo_work_priority_and_explicit_fields():
    d = Deadlines(work_s, ttft_slo_s=2.0, work_factor=3.0)
    assert d.deadline_s(request("chat", 10, 0.0)) == pytest.approx(2.0)  # 3 x 0.1 s < SLO
    assert d.deadline_s(request("doc", 1000, 0.0)) == pytest.approx(30.0)  # 3 x 10 s of work
    assert d.deadline_s(request("vip", 10, 0.0, priority=-1)) == pytest.approx(1.0)
    assert d.deadline_s(request("own", 10, 0.0, deadline_s=0.5)) == pytest.approx(0.5)
    assert Deadlines(work_s).deadline_s(request("x", 100, 0.0)) == pytest.approx(3.0)


def test_remaining_work_counts_tokens_in_flight():
    d = Deadlines(work_s)
    r = request("a", 100, 0.0, done=40)
    r.num_inflight_tokens = 10
    assert d.remaining_work_s(r) == pytest.approx(0.5)
    assert d.total_work_s(r) == pytest.approx(1.0)


def test_policies_by_name():
    assert isinstance(make_policy("fcfs"), FCFS)
    assert isinstance(make_policy("lars", context()), LARS)
    with pytest.raises(ValueError, match="--scheduler"):
        make_policy("sjf", context())
    with pytest.raises(ValueError, match="step-time model"):
        make_policy("edf")
