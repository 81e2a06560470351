"""The interconnect model: which link a group uses on the (kvp, pp, tp) grid, and how collective costs
scale with bytes and group size."""

from __future__ import annotations

import pytest

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.planner.interconnect import Interconnect, comm_costs, rank_of
from mnemosyne.scheduler.latency_model import Layout

NET = Interconnect(gpus_per_node=8, nvlink_bytes_per_s=400e9, nvlink_latency_s=10e-6, ib_bytes_per_s=40e9,
                   ib_latency_s=30e-6)
LLAMA_8B = PRESETS["llama-3-8b"]


def test_a_group_inside_one_node_uses_nvlink_and_one_across_nodes_infiniband():
    assert NET.link(range(8)) == (400e9, 10e-6)
    assert NET.link(range(4, 12)) == (40e9, 30e-6)
    assert NET.link([3]) == (400e9, 10e-6)


def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_bytes():
    one_gb = 1e9
    assert NET.all_reduce_s(one_gb, range(1)) == 0.0
    assert NET.all_reduce_s(one_gb, range(2)) == pytest.approx(10e-6 + one_gb / 400e9)
    assert NET.all_reduce_s(one_gb, range(8)) == pytest.approx(10e-6 + 1.75 * one_gb / 400e9)
    # twice the bytes, twice the bandwidth term
    assert (NET.all_reduce_s(2 * one_gb, range(8)) - 10e-6) == pytest.approx(2 * (NET.all_reduce_s(one_gb, range(8))
                                                                                 - 10e-6))
    # across nodes: ten times slower links
    assert NET.all_reduce_s(one_gb, range(16)) == pytest.approx(30e-6 + 2 * 15 / 16 * one_gb / 40e9)


def test_all_gather_receives_n_minus_1_parts_and_a_send_one():
    assert NET.all_gather_s(1e6, range(4)) == pytest.approx(10e-6 + 3e6 / 400e9)
    assert NET.all_gather_s(1e6, [0, 8, 16, 24]) == pytest.approx(30e-6 + 3e6 / 40e9)
    assert NET.send_s(1e6, 7, 8) == pytest.approx(30e-6 + 1e6 / 40e9)
    assert NET.send_s(1e6, 6, 7) == pytest.approx(10e-6 + 1e6 / 400e9)


def test_rank_grid_has_tp_fastest():
    layout = Layout(tp=2, pp=3, kvp=2)
    ranks = [rank_of(layout, k, s, t) for k in range(2) for s in range(3) for t in range(2)]
    assert ranks == list(range(12))
    assert rank_of(layout, 1, 0, 1) == 7


def test_no_collective_costs_for_a_single_gpu():
    c = comm_costs(LLAMA_8B, Layout(), NET)
    assert (c.tp_fixed_s, c.tp_per_token_s, c.hop_fixed_s, c.hop_per_token_s, c.merge_fixed_s,
            c.merge_per_token_s) == (0, 0, 0, 0, 0, 0)


def test_tp_all_reduces_per_layer_and_skipped_when_measured_at_this_tp():
    c = comm_costs(LLAMA_8B, Layout(tp=8), NET)
    assert c.tp_fixed_s == pytest.approx(2 * 32 * 10e-6)
    assert c.tp_per_token_s == pytest.approx(2 * 32 * 1.75 * 4096 * 3 / 400e9)  # float32 reduce-scatter + bf16 all-gather
    assert comm_costs(LLAMA_8B, Layout(tp=8), NET, measured_tp=8).tp_per_token_s == 0.0
    # tp=16 cannot sit in one 8-GPU node: its all-reduces cross InfiniBand
    assert comm_costs(LLAMA_8B, Layout(tp=16), NET).tp_per_token_s > 8 * c.tp_per_token_s


def test_pipeline_hops_cross_nodes_only_where_the_stages_do():
    inside = comm_costs(LLAMA_8B, Layout(tp=2, pp=4), NET)  # ranks 0..7: one node
    assert inside.hop_fixed_s == pytest.approx(3 * 10e-6)
    assert inside.hop_per_token_s == pytest.approx(3 * 2 * 4096 * 2 / 400e9)  # hidden and residual
    across = comm_costs(LLAMA_8B, Layout(tp=8, pp=4), NET)  # one stage per node: every hop crosses
    assert across.hop_fixed_s == pytest.approx(3 * 30e-6)
    assert across.hop_per_token_s == pytest.approx(10 * inside.hop_per_token_s)
    assert comm_costs(LLAMA_8B, Layout(tp=8, pp=1, kvp=4), NET).hop_per_token_s == 0.0


def test_kvp_merge_gathers_float32_partials_from_every_group():
    c = comm_costs(LLAMA_8B, Layout(tp=1, pp=1, kvp=4), NET)
    part = 32 * 129 * 4  # heads × (head_dim + 1) float32 per token
    assert c.merge_fixed_s == pytest.approx(32 * 10e-6)
    assert c.merge_per_token_s == pytest.approx(32 * 3 * part / 400e9)
    wide = comm_costs(LLAMA_8B, Layout(tp=8, pp=1, kvp=4), NET)  # groups on four nodes, 1/8 of the heads
    assert wide.merge_per_token_s == pytest.approx(32 * 3 * part / 8 / 40e9)
    assert comm_costs(LLAMA_8B, Layout(tp=8), NET).merge_per_token_s == 0.0
