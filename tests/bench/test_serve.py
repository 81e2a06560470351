"""`mnemosyne bench serve` end to end on CPU: the trace it builds is the simulator's, it replays a trace
against a running dummy:tiny server with prompts and outputs of exactly the trace's lengths, and it
launches and stops servers itself to compare two configurations."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from mnemosyne.bench.serve import GpuEnergy, run_configs, solo_specs
from mnemosyne.cli import build_parser, main
from mnemosyne.sim.cli import trace_from_args
from tests.server.harness import Server, children_of, start_server

MODEL = "dummy:tiny"
TRACE_FLAGS = ["--num-requests", "10", "--rate", "8", "--long-fraction", "0", "--long-at-s", "0.3",
               "--long-prompt-tokens", "1500,2000", "--short-prompt-tokens", "8,64", "--output-tokens", "3,12",
               "--trace-seed", "3", "--long-threshold", "1024"]
SLO_FLAGS = ["--ttft-slo-ms", "5000", "--tbt-slo-ms", "2000", "--long-ttft-slo-ms-per-ktok", "5000"]


def test_the_trace_is_the_simulators():
    bench = build_parser().parse_args(["bench", "serve", *TRACE_FLAGS])
    sim = build_parser().parse_args(["simulate", MODEL, *TRACE_FLAGS])
    trace = trace_from_args(bench)
    assert trace == trace_from_args(sim)
    assert len(trace) == 11 and [t.arrival_s for t in trace] == sorted(t.arrival_s for t in trace)
    long = [t for t in trace if t.num_prompt_tokens >= 1024]
    assert [t.arrival_s for t in long] == [0.3] and 1500 <= long[0].num_prompt_tokens <= 2000
    assert all(8 <= t.num_prompt_tokens <= 64 for t in trace if t not in long)
    with pytest.raises(ValueError, match="--long-at-s"):
        trace_from_args(build_parser().parse_args(["bench", "serve", "--long-at-s", "soon"]))


def test_run_labels():
    assert run_configs(None, None) == [("server", None)]
    base = "dummy:tiny --device cpu"
    runs = run_configs(base, ["--scheduler lars", "--scheduler fcfs --chunking fixed:64"])
    assert runs == [("lars+adaptive", ["dummy:tiny", "--device", "cpu", "--scheduler", "lars"]),
                    ("fcfs+fixed:64", ["dummy:tiny", "--device", "cpu", "--scheduler", "fcfs", "--chunking", "fixed:64"])]
    # runs that differ in something else keep their arguments as labels
    assert [label for label, _ in run_configs(base, ["--tbt-slo-ms 50", "--tbt-slo-ms 100"])] == \
        ["--tbt-slo-ms 50", "--tbt-slo-ms 100"]
    assert run_configs(base, None)[0][0] == "lars+adaptive"


def test_bad_flags_exit_2(capsys):
    assert main(["bench", "serve", "--compare", "--scheduler fcfs"]) == 2
    assert "--compare needs --launch" in capsys.readouterr().err
    assert main(["bench", "serve", "--tbt-slo-ms", "0"]) == 2


def test_gpu_energy_is_read_where_nvml_is():
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        assert GpuEnergy.open() is None
        return
    meter = GpuEnergy.open()
    assert meter is not None
    first = meter.joules()
    assert first is not None and first >= 0 and meter.joules() >= first


def test_solo_requests_spread_over_the_short_prompts_lengths():
    """The solo p99 is compared with short*'s, whose tail is the longest chat prompts: the solo set
    reaches the longest short prompt whatever the trace's order."""
    from mnemosyne.sim.trace import TraceRequest

    short = [TraceRequest(0.1 * i, n, 8) for i, n in enumerate([500, 100, 400, 200, 300])]
    lengths = lambda n: [t.num_prompt_tokens for t in solo_specs(short, n)]  # noqa: E731
    assert lengths(1) == [500]
    assert lengths(2) == [300, 500]
    assert lengths(5) == [100, 200, 300, 400, 500]
    assert lengths(7) == [100, 200, 300, 300, 400, 500, 500]
    assert lengths(0) == []


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    log_path = tmp_path_factory.mktemp("bench") / "server.log"
    srv = start_server([MODEL, "--device", "cpu", "--kv-cache-memory", "0.05", "--max-num-batched-tokens", "256"],
                       log_path, api_key="sk-bench")
    yield srv
    srv.stop(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replay_against_a_running_server(tiny_server: Server, tmp_path):
    before = tiny_server.metrics()
    out = tmp_path / "out"
    flags = ["bench", "serve", "--url", tiny_server.url, "--api-key", "sk-bench", *TRACE_FLAGS, *SLO_FLAGS,
             "--solo-requests", "3", "--save-trace", str(tmp_path / "trace.jsonl")]
    assert main([*flags, "-o", str(out)]) == 0
    doc = json.loads((out / "serve.json").read_text())
    run = doc["runs"]["server"]
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    timings = run["timings"]
    assert run["model"] == MODEL and len(timings) == len(trace) == 11
    for spec, t in zip(trace, timings, strict=True):
        assert t["error"] is None
        assert t["num_prompt_tokens"] == spec["num_prompt_tokens"]
        assert len(t["token_s"]) == t["num_tokens"] == spec["num_output_tokens"]  # one chunk per token
        assert t["start_s"] >= t["arrival_s"] == spec["arrival_s"]
        assert t["start_s"] < t["token_s"][0] <= t["token_s"][-1] <= t["end_s"]
    # the server saw exactly the trace's lengths (plus 2 warm-up and 3 solo requests of 2 tokens each)
    after = tiny_server.metrics()
    num_prompt = after["mnemosyne_prompt_tokens_total"] - before["mnemosyne_prompt_tokens_total"]
    num_output = after["mnemosyne_generation_tokens_total"] - before["mnemosyne_generation_tokens_total"]
    assert num_output == sum(s["num_output_tokens"] for s in trace) + 5 * 2
    short = [s["num_prompt_tokens"] for s in trace if s["num_prompt_tokens"] < 1024]  # warm-up and solo draw these
    solo = [t["num_prompt_tokens"] for t in run["solo"]]  # spread over the short prompts' lengths
    assert solo == sorted(solo) and set(solo) <= set(short) and solo[-1] == max(short)
    assert num_prompt == sum(s["num_prompt_tokens"] for s in trace) + short[0] + short[1] + sum(solo)
    summary = run["summary"]
    assert summary["long"]["num_requests"] == 1 and summary["short"]["num_requests"] == 10
    assert summary["solo"]["num_requests"] == 3 and summary["solo"]["ttft_s"]["p50"] > 0
    assert summary["energy"]["joules"] is None or summary["energy"]["joules"] > 0
    # the server's own histograms over the replay alone: a gap per token after each request's first
    server = summary["server"]
    assert server["tbt"]["count"] == sum(s["num_output_tokens"] - 1 for s in trace)
    assert server["step"]["count"] >= max(s["num_output_tokens"] for s in trace)
    assert server["tbt"]["bound_s"] == 1.0 and 0 <= server["tbt"]["share"] <= 1  # 2 s SLO: the 1 s bucket
    assert "server" in (out / "serve.txt").read_text() and "energy n/a" in (out / "serve.txt").read_text()
    assert (out / "serve.png").read_bytes()[:4] == b"\x89PNG"
    # the same trace again: fresh prompts, so the prefix cache serves nothing from the first run
    assert main([*flags, "-o", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "serve.json").read_text())["runs"]["server"]
    assert [t["num_cached_tokens"] for t in again["timings"]] == [0] * len(trace)
    assert tiny_server.metrics()["mnemosyne_prefix_cache_hit_tokens_total"] == \
        before["mnemosyne_prefix_cache_hit_tokens_total"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launch_and_compare(tmp_path):
    children = set(children_of(os.getpid()))
    out = tmp_path / "cmp"
    trace = ["--num-requests", "4", "--rate", "10", "--long-fraction", "0", "--long-at-s", "0.1",
             "--long-prompt-tokens", "1100,1100", "--short-prompt-tokens", "8,16", "--output-tokens", "2,4",
             "--long-threshold", "1024"]
    assert main(["bench", "serve", "--launch", f"{MODEL} --device cpu --kv-cache-memory 0.05 --tbt-slo-ms 500",
                 "--compare", "--scheduler lars --chunking adaptive", "--scheduler fcfs --chunking fixed:128",
                 *trace, *SLO_FLAGS, "--solo-requests", "1", "-o", str(out)]) == 0
    doc = json.loads((out / "serve.json").read_text())
    assert list(doc["runs"]) == ["lars+adaptive", "fcfs+fixed:128"]
    for run in doc["runs"].values():
        assert [t["error"] for t in run["timings"]] == [None] * 5
    assert doc["setup"]["serve_args"]["fcfs+fixed:128"][-4:] == ["--scheduler", "fcfs", "--chunking", "fixed:128"]
    assert "serving dummy:tiny" in (out / "server-1.log").read_text()
    table = (out / "serve.txt").read_text()
    assert "lars+adaptive" in table and "fcfs+fixed:128" in table
    assert set(children_of(os.getpid())) <= children, "a launched server outlived the run"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trace_timeout_still_reports(tiny_server: Server, tmp_path):
    """Requests still streaming at --trace-timeout-s are closed (the server aborts them) and reported as
    errors, as is one never sent; the report is written all the same."""
    out = tmp_path / "t"
    assert main(["bench", "serve", "--url", tiny_server.url, "--api-key", "sk-bench", "--num-requests", "3",
                 "--rate", "10", "--long-fraction", "0", "--short-prompt-tokens", "8,8", "--output-tokens",
                 "2900,2900", "--long-at-s", "30", "--long-prompt-tokens", "1100,1100", "--long-threshold", "1024",
                 "--trace-timeout-s", "1", "--solo-requests", "0", *SLO_FLAGS, "-o", str(out)]) == 0
    run = json.loads((out / "serve.json").read_text())["runs"]["server"]
    short, long = run["timings"][:3], run["timings"][3]
    for t in short:
        assert t["error"].startswith("unfinished") and 0 < len(t["token_s"]) < 2900 and t["end_s"] < 3
    assert long["error"].startswith("not sent") and long["token_s"] == []
    assert run["summary"]["all"]["num_errors"] == 4 and run["summary"]["goodput_requests_per_s"] == 0
    deadline_s = time.monotonic() + 20
    while tiny_server.metrics()["mnemosyne_num_requests_running"] != 0:
        assert time.monotonic() < deadline_s, "the closed streams' requests are still running"
        time.sleep(0.2)
