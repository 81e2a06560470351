"""benchmarks/layout_check.py's comparison of a layout's greedy tokens with a reference run's: strict
equality, and near-ties that bf16 rounding may order either way, after which it goes on from the
reference's token."""

from __future__ import annotations

from benchmarks.layout_check import TIE_TOLERANCE, describe_match, match_with_ties


def _run(tokens: list[int], margins: list[float], runner_up: int = 0) -> dict:
    return {"tokens": tokens, "top2": [[[t, runner_up], [-1.0, -1.0 - m]] for t, m in zip(tokens, margins, strict=True)]}


REFERENCE = _run([5, 6, 7, 8], [0.5, 0.01, 0.5, 0.5], runner_up=9)


def _layout(script: dict[tuple[int, ...], dict]):
    calls = []

    def generate(forced: list[int], n: int) -> dict:
        calls.append((tuple(forced), n))
        return script[tuple(forced)]

    return generate, calls


def test_equal_runs_match_without_ties():
    generate, calls = _layout({(): _run([5, 6, 7, 8], [0.5] * 4)})
    match = match_with_ties(REFERENCE, generate)
    assert (match["equal_prefix"], match["matched"], match["ties"], calls) == (4, 4, [], [((), 4)])
    assert describe_match(match) == "4/4 greedy tokens equal"


def test_a_near_tie_flipped_goes_on_from_the_references_token():
    # the layout picks 9 at index 1, where the reference had 6 just 0.01 ahead of 9; its own margin is small
    flipped = {"tokens": [5, 9, 3, 3], "top2": [[[5, 9], [-1.0, -1.5]], [[9, 6], [-1.0, -1.02]],
                                                 [[3, 9], [-1.0, -2.0]], [[3, 9], [-1.0, -2.0]]]}
    generate, calls = _layout({(): flipped, (5, 6): _run([7, 8], [0.5, 0.5], runner_up=9)})
    match = match_with_ties(REFERENCE, generate)
    assert calls == [((), 4), ((5, 6), 2)]
    assert match["tokens"] == [5, 9, 3, 3] and match["equal_prefix"] == 1 and match["matched"] == 4
    assert [(t["index"], t["reference"], t["layout"]) for t in match["ties"]] == [(1, 6, 9)]
    assert abs(match["ties"][0]["margin"] - 0.02) < 1e-9
    assert describe_match(match).startswith(f"1/4 greedy tokens equal; 4/4 with 1 near-tie within {TIE_TOLERANCE}")


def test_a_difference_that_is_no_near_tie_stops_the_match():
    # index 1 again, but the layout is sure of its token: a real divergence, not rounding
    sure = {"tokens": [5, 9, 3, 3], "top2": [[[5, 9], [-1.0, -1.5]], [[9, 6], [-1.0, -1.5]],
                                              [[3, 9], [-1.0, -2.0]], [[3, 9], [-1.0, -2.0]]]}
    generate, calls = _layout({(): sure})
    match = match_with_ties(REFERENCE, generate)
    assert (match["equal_prefix"], match["matched"], match["ties"], len(calls)) == (1, 1, [], 1)
    # a clear margin in the reference (index 2) is no near-tie either, whatever the layout's
    late = {"tokens": [5, 6, 9, 3], "top2": [[[5, 9], [-1.0, -1.5]], [[6, 9], [-1.0, -1.5]],
                                              [[9, 7], [-1.0, -1.01]], [[3, 9], [-1.0, -2.0]]]}
    generate, _ = _layout({(): late})
    assert match_with_ties(REFERENCE, generate)["matched"] == 2


def test_a_tie_at_the_last_token_needs_no_more_generation():
    last = _run([5, 6, 7, 8], [0.5, 0.5, 0.5, 0.01], runner_up=9)
    flipped = {"tokens": [5, 6, 7, 9], "top2": [*last["top2"][:3], [[9, 8], [-1.0, -1.01]]]}
    generate, calls = _layout({(): flipped})
    match = match_with_ties(last, generate)
    assert match["matched"] == 4 and len(match["ties"]) == 1 and calls == [((), 4)]
