"""The step-time model: roofline against hand-computed floors, profile interpolation, layouts, and
the incremental estimate the chunking policy uses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.scheduler.latency_model import (
    DEVICES,
    LatencyModel,
    Layout,
    Profile,
    Profiled,
    Roofline,
    build_latency_model,
)
from tests.scheduler.factories import synthetic_model

LLAMA_8B = PRESETS["llama-3-8b"]
H100 = DEVICES["h100"]


def roofline(layout: Layout | None = None) -> LatencyModel:
    layout = layout or Layout()
    return LatencyModel(Roofline(LLAMA_8B, H100, layout.tp), LLAMA_8B, H100, layout)


def test_roofline_prefill_is_flop_bound_and_decode_bandwidth_bound():
    model, rate = roofline(), H100.peak_flops * H100.flops_efficiency
    n = 8192
    flops = 2 * LLAMA_8B.num_params_non_embedding * n + 2 * 32 * 4096 * n * n  # the MISSION's floor, ~
    assert model.step_time_s([(n, 0)]) == pytest.approx(flops / rate, rel=0.1)
    weights = (LLAMA_8B.num_params_non_embedding + LLAMA_8B.vocab_size * 4096) * 2
    kv = 32 * 2 * 8 * 128 * 2 * 32768  # one decode over 32K cached tokens
    floor_s = (weights + kv) / (H100.hbm_bytes_per_s * H100.bandwidth_efficiency)
    assert model.step_time_s([(1, 32768)]) == pytest.approx(floor_s + H100.step_overhead_s, rel=0.1)


def test_attention_grows_with_the_prefix_and_tensor_parallelism_divides_compute():
    model = roofline()
    late, early = model.step_time_s([(512, 500_000)]), model.step_time_s([(512, 0)])
    assert late > 10 * early
    tp8 = roofline(Layout(tp=8))
    # the sums of float32 partials (3 bytes an element, against 2 for a bf16 all-reduce) cost the rest
    assert tp8.step_time_s([(8192, 0)]) < model.step_time_s([(8192, 0)]) / 3
    assert tp8.step_time_s([(1, 100)]) > roofline().costs.base_s(1, 1) / 8  # all-reduce latency is added


def test_kvp_bounds_attention_by_one_group_and_adds_a_merge():
    group = 100_000
    kvp = roofline(Layout(kvp=4, kvp_group_max_tokens=group))
    assert kvp.step_time_s([(256, 50_000)]) == roofline().step_time_s([(256, 50_000)])
    at_group = roofline().step_time_s([(256, group)])
    assert at_group < kvp.step_time_s([(256, 350_000)]) < 1.1 * at_group
    assert kvp.step_time_s([(1, 350_000)]) < 0.6 * roofline().step_time_s([(1, 350_000)])  # KV read / 3.5


def test_estimate_is_incremental_and_matches_a_whole_step():
    model = roofline(Layout(tp=2, pp=2))
    batch = [(1, 1000), (1, 50_000), (512, 20_000), (1, 7), (64, 0)]
    est = model.estimate()
    for i, (n, p) in enumerate(batch):
        assert est.time_with_s(n, p) == pytest.approx(model.step_time_s(batch[: i + 1]))
        est.add(n, p)
    assert est.time_s == pytest.approx(model.step_time_s(batch))
    assert model.estimate().time_s == 0.0


def test_prefill_work_is_additive_and_superlinear():
    model = roofline()
    a, b, c = 0, 300_000, 1_000_000
    assert model.prefill_work_s(a, b) + model.prefill_work_s(b, c) == pytest.approx(model.prefill_work_s(a, c))
    assert model.prefill_work_s(900_000, 1_000_000) > 5 * model.prefill_work_s(0, 100_000)
    chunked = sum(model.step_time_s([(2048, p)]) for p in range(0, 1 << 20, 2048))
    assert model.prefill_work_s(0, 1 << 20) == pytest.approx(chunked, rel=0.1)
    assert model.prefill_work_s(5, 5) == 0.0


def tiny_profile() -> Profile:
    return Profile(
        model="dummy:tiny", device_name="test", dtype="float32", tp=1,
        linear_num_tokens=(16, 256), linear_s=(0.010, 0.025), per_seq_s=0.001,
        chunk_num_new=(32, 128), chunk_num_prefix=(0, 1000), chunk_s=((0.001, 0.003), (0.002, 0.010)),
        decode_num_decodes=(1, 8), decode_prefix_tokens=(100, 1000),
        decode_attention_s=((0.001, 0.002), (0.004, 0.012)), decode_step_s=((0.011, 0.012), (0.02, 0.03)))


def test_profile_round_trips_and_interpolates(tmp_path):
    path = tmp_path / "p.json"
    tiny_profile().save(path, {"check": {"all": {"median": 0.01}}})
    profile = Profile.load(path)
    assert profile == tiny_profile()
    costs = Profiled(profile)
    assert costs.base_s(16, 1) == pytest.approx(0.010)
    assert costs.base_s(136, 3) == pytest.approx(0.0175 + 0.002)  # halfway, plus two extra requests
    assert costs.base_s(496, 1) == pytest.approx(0.040)  # extrapolated along the last segment
    assert costs.base_s(1, 1) == pytest.approx(0.010)  # flat below the grid
    assert costs.chunk_attention_s(80, 500) == pytest.approx((0.002 + 0.006) / 2)
    assert costs.chunk_attention_s(32, 2000) == pytest.approx(0.005)
    assert costs.decode_step_s(8, 1000, 200) == pytest.approx(0.03)
    assert costs.decode_step_s(8, 1900, 500) == pytest.approx(0.04)  # linear in the KV read past the grid
    model = LatencyModel(costs, PRESETS["tiny"], DEVICES["cpu"])
    assert model.step_time_s([(1, 100)]) == pytest.approx(0.011)
    # mixed: linear(33 tokens) + the chunk's and the decode's attention; a decode's own cost past its
    # token is in the decode tables, so only a second multi-token chunk adds per_seq_s
    assert model.step_time_s([(1, 100), (32, 0)]) == pytest.approx(0.010 + 0.015 * 17 / 240 + 0.002)
    assert model.step_time_s([(1, 100), (32, 0), (32, 0)]) == pytest.approx(
        0.010 + 0.015 * 49 / 240 + 0.001 + 0.003)  # one extra chunk, two chunks and a decode attending
    assert Profiled(profile, tp=2).chunk_attention_s(32, 0) == pytest.approx(0.0005)


def test_decode_steps_replayed_as_graphs_cost_their_padded_batch():
    eager = Profiled(tiny_profile())
    graphed = Profiled(replace(tiny_profile(), decode_graph_buckets=(1, 8)))
    assert graphed.decode_step_s(3, 1000, 400) == pytest.approx(eager.decode_step_s(8, 1000, 400))
    assert graphed.decode_step_s(1, 1000, 1000) == pytest.approx(eager.decode_step_s(1, 1000, 1000))
    assert graphed.decode_step_s(9, 1000, 400) == pytest.approx(eager.decode_step_s(9, 1000, 400))  # past them
    assert eager.decode_step_s(3, 1000, 400) < graphed.decode_step_s(3, 1000, 400)


def test_decode_steps_are_read_at_their_imbalance_between_even_uneven_and_skewed():
    from mnemosyne.scheduler.latency_model import uneven_imbalance, uneven_prefixes

    # decode_step_s at 8 decodes: even 0.03, uneven 0.05, skewed 0.09 (at 1000 tokens of KV)
    profile = replace(tiny_profile(), skewed_step_s=((0.011, 0.012), (0.02, 0.09)),
                      uneven_step_s=((0.011, 0.012), (0.02, 0.05)))
    costs = Profiled(profile)
    knee = uneven_imbalance(8)
    assert max(uneven_prefixes(8, 1000)) * 8 / 1000 == pytest.approx(knee, rel=0.02)
    assert costs.decode_step_s(8, 1000, 125) == pytest.approx(0.03)  # even: imbalance 1
    assert costs.decode_step_s(8, 1000, round(125 * knee)) == pytest.approx(0.05, rel=0.01)
    assert costs.decode_step_s(8, 1000, 1000) == pytest.approx(0.09)  # every token in one request
    times = [costs.decode_step_s(8, 1000, m) for m in range(125, 1001, 25)]
    assert times == sorted(times)
    assert Profiled(tiny_profile()).decode_step_s(8, 1000, 500) == pytest.approx(0.03)  # no uneven table


def test_bad_profiles_and_devices_name_the_flag(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="--latency-profile"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="--latency-profile"):
        Profile.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="--roofline-device"):
        build_latency_model(LLAMA_8B, Layout(), "tpu")


def test_synthetic_model_used_by_the_other_tests_is_what_it_says():
    model = synthetic_model()
    assert model.step_time_s([(100, 1000)]) == pytest.approx(1e-3 + 1e-3 + 1e-8 * 100 * 1050)


def test_a_gpu_profile_reads_cudnn_chunks_at_whole_waves_of_tiles(tmp_path):
    """A chunk that the GPU backend sends to cuDNN pays for whole waves of query tiles: with 32 q heads
    on 132 SMs, 600 tokens cost what 1024 do. The table is read there; Triton's chunks where they are."""
    table = Profile(
        model="dummy:llama-3-8b", device_name="NVIDIA H200", dtype="bfloat16", tp=1,
        linear_num_tokens=(16, 4096), linear_s=(0.009, 0.095), per_seq_s=0.0,
        chunk_num_new=(256, 512, 1024, 2048), chunk_num_prefix=(0, 65536),
        chunk_s=((0.001, 0.033), (0.001, 0.034), (0.002, 0.065), (0.004, 0.120)),
        decode_num_decodes=(1, 8), decode_prefix_tokens=(100, 1000),
        decode_attention_s=((0.001, 0.002), (0.004, 0.012)), decode_step_s=((0.011, 0.012), (0.02, 0.03)))
    gpu = replace(table, num_sms=132, num_q_heads=32, num_kv_heads=8, triton_chunk_rows=8192)
    gpu.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == gpu
    costs, before = Profiled(gpu), Profiled(table)
    assert costs.cost_tokens(600, 65536) == 1024 and costs.chunk_attention_s(600, 65536) == pytest.approx(0.065)
    assert before.chunk_attention_s(600, 65536) == pytest.approx(0.034 + 0.031 * 88 / 512)  # a profile without SMs
    assert costs.cost_tokens(300, 65536) == 512  # one wave, as 512 tokens
    assert costs.cost_tokens(224, 65536) == 224  # the Triton kernel's
    assert costs.cost_tokens(600, 0) == 600 and costs.cost_tokens(1536, 4096) == 1536  # cuDNN, whole waves
    assert costs.cost_tokens(1100, 4096) == 1100  # Triton's (1100 x 4096 token pairs)
    assert Profiled(gpu, tp=2).cost_tokens(600, 65536) == 1024 and Profiled(gpu, tp=2).cost_tokens(1100, 65536) == 2048
