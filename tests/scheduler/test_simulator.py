"""The simulator runs the engine's scheduler on a virtual clock: every request finishes with its
output length, LARS beats FCFS for short requests behind a long one, adaptive chunks keep TBT in
the SLO, and a 10M-token request on 128 GPUs takes seconds to simulate."""

from __future__ import annotations

import json

import pytest

from mnemosyne.cli import main
from mnemosyne.config import EngineConfig
from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.scheduler.factory import layout_of
from mnemosyne.scheduler.latency_model import DEVICES, build_latency_model
from mnemosyne.scheduler.policy import Deadlines
from mnemosyne.sim.report import summarize
from mnemosyne.sim.simulator import simulate
from mnemosyne.sim.trace import MixedWorkload, TraceRequest, load_trace, save_trace

MODEL = PRESETS["llama-3.1-8b"]


def run(trace, **overrides):
    config = EngineConfig(**{"model": "dummy:llama-3.1-8b", "tensor_parallel_size": 8, "roofline_device": "h100",
                             "tbt_slo_ms": 50.0, "ttft_slo_ms": 2000.0, "max_num_batched_tokens": 16384,
                             "max_model_len": 1 << 24, **overrides})
    latency = build_latency_model(MODEL, layout_of(config), "h100")
    result = simulate(trace, config, MODEL, latency, DEVICES["h100"])
    deadlines = Deadlines(latency.prefill_work_s, 2.0, config.deadline_work_factor)
    return result, summarize(result, deadlines.deadline_s, 0.05, long_threshold=32768)


@pytest.fixture(scope="module")
def trace() -> list[TraceRequest]:
    """Chat traffic at 2 requests/s with two 256K-token prompts in the middle of it."""
    chats = MixedWorkload(num_requests=60, rate_per_s=2.0, long_fraction=0.0, seed=3).generate()
    return sorted([*chats, TraceRequest(2.0, 256 * 1024, 64), TraceRequest(6.0, 200_000, 64)],
                  key=lambda r: r.arrival_s)


def test_every_request_finishes_with_its_output_length(trace):
    result, summary = run(trace)
    assert [r.num_output_tokens for r in result.requests] == [t.num_output_tokens for t in trace]
    assert summary["all"]["num_requests"] == len(trace) and summary["long"]["num_requests"] == 2
    assert all(r.metrics.first_token_s >= r.metrics.arrival_s for r in result.requests)


def test_short_star_is_the_short_requests_that_waited_during_a_long_prefill(trace):
    result, summary = run(trace)
    longs = [(r.metrics.arrival_s, r.metrics.first_token_s) for r in result.requests if r.num_prompt_tokens >= 32768]
    waited = [r for r in result.requests if r.num_prompt_tokens < 32768
              and any(r.metrics.arrival_s < end and start < r.metrics.first_token_s for start, end in longs)]
    star = summary["short_during_long_prefill"]
    assert 0 < star["num_requests"] == len(waited) < summary["short"]["num_requests"]
    assert star["ttft_s"]["max"] == max(r.metrics.ttft_s for r in waited)
    assert star["tbt_s"]["max"] <= summary["short"]["tbt_s"]["max"]  # gaps inside the prefills only


def test_lars_and_adaptive_chunks_against_fcfs_and_fixed_chunks(trace):
    _, lars = run(trace, scheduler="lars", chunking="adaptive")
    _, fcfs = run(trace, scheduler="fcfs", chunking="adaptive")
    _, fixed = run(trace, scheduler="lars", chunking="fixed:2048", max_num_batched_tokens=2048)
    assert fcfs["short"]["ttft_s"]["p99"] > 10 * lars["short"]["ttft_s"]["p99"]
    assert lars["all"]["tbt_s"]["max"] <= 0.05 + 1e-9
    assert fixed["all"]["tbt_s"]["p99"] > 0.05
    assert lars["long"]["ttft_s"]["max"] < 1.15 * fixed["long"]["ttft_s"]["max"]


def test_a_10m_token_request_on_128_gpus_simulates_in_seconds():
    result, summary = run([TraceRequest(0.0, 10_000_000, 32), TraceRequest(100.0, 1000, 32)],
                          kv_parallel_size=16, kvp_group_max_tokens=655_360)
    assert result.wall_s < 20
    assert result.requests[0].num_output_tokens == 32
    assert summary["all"]["tbt_s"]["max"] <= 0.05  # KVP splits the 10M-token KV read 16 ways
    assert result.requests[1].metrics.ttft_s < 2.0  # a chat request is not stuck behind it


def test_trace_files_round_trip_and_bad_lines_name_the_file(tmp_path):
    trace = MixedWorkload(num_requests=20, long_fraction=0.2, seed=1).generate()
    save_trace(tmp_path / "t.jsonl", trace)
    assert load_trace(tmp_path / "t.jsonl") == trace
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 0, "num_prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl"):
        load_trace(tmp_path / "bad.jsonl")


def test_simulate_command_writes_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["simulate", "dummy:llama-3.1-8b", "-tp", "8", "--num-requests", "40", "--long-fraction", "0.05",
                 "--long-prompt-tokens", "65536,131072", "--tbt-slo-ms", "50", "--max-model-len", "262144",
                 "--max-num-batched-tokens", "16384", "-o", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert report["setup"]["num_gpus"] == 8 and report["all"]["num_requests"] == 40
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "TTFT p99" in printed and "short*" in printed
