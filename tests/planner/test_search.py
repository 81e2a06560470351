"""The layout search: layouts the engine can run, memory feasibility, SLOs, ranking."""

from __future__ import annotations

import math

import pytest

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.planner.hardware import GPUS
from mnemosyne.planner.interconnect import Interconnect
from mnemosyne.planner.search import Search, Slos, best_per_count, candidates, layouts, rank

LLAMA_8B = PRESETS["llama-3-8b"]
LLAMA_70B = PRESETS["llama-3-70b"]
H100, H200 = GPUS["h100"], GPUS["h200"]


@pytest.mark.parametrize("num_gpus", [1, 2, 4, 6, 8, 12, 64, 128])
def test_layouts_multiply_to_the_gpu_count_and_keep_tp_in_a_node(num_gpus):
    found = layouts(LLAMA_8B, num_gpus, gpus_per_node=8)
    assert found
    for ly in found:
        assert ly.tp * ly.pp * ly.kvp == num_gpus
        assert ly.tp <= 8 and LLAMA_8B.num_heads % ly.tp == 0 and ly.pp <= LLAMA_8B.num_layers
    assert len({(ly.tp, ly.pp, ly.kvp) for ly in found}) == len(found)


def test_layouts_follow_the_node_size_and_the_layer_count():
    assert max(ly.tp for ly in layouts(LLAMA_8B, 16, gpus_per_node=4)) == 4
    assert all(ly.pp <= 32 for ly in layouts(LLAMA_8B, 128, gpus_per_node=8))
    assert {ly.tp for ly in layouts(PRESETS["tiny"], 8, gpus_per_node=8)} == {1, 2, 4}  # 4 q heads


def test_candidates_spread_the_context_over_every_kvp_group_once_per_budget():
    context = 10 * 2**20
    found = candidates(LLAMA_8B, 128, context, 8, (None, 0.03), "adaptive", 2048)
    assert len(found) == 2 * len(layouts(LLAMA_8B, 128, 8))
    for c in found:
        ly = c.layout
        if ly.kvp == 1:
            assert ly.kvp_group_max_tokens is None
        else:
            assert math.ceil(context / ly.kvp_group_max_tokens) == ly.kvp


def test_70b_on_one_gpu_is_rejected_for_memory_and_fits_on_eight():
    one = Search(LLAMA_70B, H100, Interconnect(), 32768).run(1)
    assert len(one) == 1 and not one[0].is_feasible and one[0].reasons[0].startswith("memory")
    eight = Search(LLAMA_70B, H100, Interconnect(), 32768).run(8)
    assert eight[0].is_feasible


def test_ranking_puts_layouts_meeting_the_slos_first():
    search = Search(LLAMA_8B, H200, Interconnect(), 1 << 18, Slos(tbt_s=0.010), (0.010,))
    ranked = search.run(4)
    ok = [v for v in ranked if v.is_feasible]
    assert ok and len(ok) < len(ranked)
    assert ranked[: len(ok)] == ok  # feasible ones first
    assert all(v.prediction.tbt_s <= 0.010 and v.prediction.max_step_s <= 0.010 for v in ok)
    assert all(any("TBT" in r or "step" in r for r in v.reasons) for v in ranked[len(ok):] if v.prediction.memory.fits)
    assert [v.prediction.ttft_s for v in ok] == sorted(v.prediction.ttft_s for v in ok)
    by_tbt = rank(ranked, "tbt")
    assert [v.prediction.tbt_s for v in by_tbt if v.is_feasible] == sorted(v.prediction.tbt_s for v in ok)
    with pytest.raises(ValueError, match="--rank-by"):
        rank(ranked, "speed")


def test_a_ttft_slo_rules_out_slow_layouts_and_a_step_budget_bounds_prefill_steps():
    free = Search(LLAMA_8B, H200, Interconnect(), 1 << 20).run(4)
    fits = [v for v in free if v.is_feasible]
    slo = sorted(v.prediction.ttft_s for v in fits)[len(fits) // 2]
    limited = Search(LLAMA_8B, H200, Interconnect(), 1 << 20, Slos(ttft_s=slo)).run(4)
    assert all(v.prediction.ttft_s <= slo for v in limited if v.is_feasible)
    assert any("TTFT" in r for v in limited for r in v.reasons)
    budget = Search(LLAMA_8B, H200, Interconnect(), 1 << 20, Slos(tbt_s=0.5), (0.5,)).run(4)
    for v in budget:
        if v.is_feasible:
            assert v.prediction.max_step_s <= 0.5


def test_best_per_count_is_none_where_nothing_fits():
    best = best_per_count(Search(LLAMA_8B, H100, Interconnect(), 10 * 2**20), [1, 16, 128])
    assert best[1] is None  # 1.3 TB of KV
    assert best[128] is not None and best[128].prediction.candidate.num_gpus == 128
    assert best[128].prediction.ttft_s < best[16].prediction.ttft_s if best[16] else True
