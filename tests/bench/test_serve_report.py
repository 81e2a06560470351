"""bench serve's arithmetic on hand-made timings: percentiles, SLOs, the classes around a long prefill,
goodput, energy per token, the solo target, the table and the plot."""

from __future__ import annotations

import pytest

from mnemosyne.bench.serve_report import (
    Slos,
    Timing,
    during_long_prefill,
    format_table,
    max_gap_series,
    percentile,
    plot,
    summarize,
)

SLOS = Slos(ttft_s=0.5, long_ttft_s_per_token=0.001, tbt_s=0.15, long_threshold=1000)


def _timing(num_prompt: int, start_s: float, token_s: list[float], error: str | None = None) -> Timing:
    return Timing(num_prompt, len(token_s), start_s, start_s, token_s, end_s=token_s[-1] if token_s else start_s + 1,
                  error=error, num_tokens=len(token_s))


def test_percentiles_interpolate_between_ranks():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_slos_per_class_and_per_request():
    assert SLOS.ttft_slo_s(999) == 0.5
    assert SLOS.ttft_slo_s(4000) == pytest.approx(4.0)
    assert SLOS.ttft_slo_s(1000) == pytest.approx(1.0)
    assert SLOS.is_met(_timing(10, 0.0, [0.4, 0.5, 0.6]))
    assert not SLOS.is_met(_timing(10, 0.0, [0.6, 0.7]))  # late first token
    assert not SLOS.is_met(_timing(10, 0.0, [0.1, 0.2, 0.4]))  # a 200 ms gap
    assert not SLOS.is_met(_timing(10, 0.0, [0.1], error="HTTP 429: busy"))
    assert SLOS.is_met(_timing(4000, 0.0, [3.9, 4.0]))  # long: 4 s allowed
    assert not SLOS.is_met(_timing(10, 0.0, []))


def _run() -> tuple[list[Timing], list[Timing]]:
    timings = [
        _timing(4000, 1.0, [5.0, 5.1, 5.2]),          # long: prefilled from 1 s to 5 s
        _timing(100, 2.0, [2.4, 2.5, 2.7]),           # short, waits during the prefill; gaps 0.1, 0.2
        _timing(100, 0.0, [0.1, 0.2, 1.5, 1.6]),      # short, first token before the prefill; gaps of 1.3 s and 0.1 s end in it
        _timing(100, 6.0, [6.1, 6.2, 6.3]),           # short, after the prefill
        _timing(100, 6.5, [], error="HTTP 429: x"),   # short, refused
    ]
    solo = [_timing(100, 0.0, [0.1, 0.15]), _timing(100, 0.0, [0.2, 0.25])]
    return timings, solo


def test_classes_around_a_long_prefill():
    timings, _ = _run()
    waiting, gaps = during_long_prefill(timings, SLOS.long_threshold)
    assert waiting == [timings[1]]
    assert gaps == pytest.approx([0.1, 0.2, 1.3, 0.1])


def test_summary_target_goodput_and_energy():
    timings, solo = _run()
    s = summarize(timings, solo, SLOS, duration_s=8.0, energy_j=1000.0)
    assert (s["all"]["num_requests"], s["short"]["num_requests"], s["long"]["num_requests"]) == (5, 4, 1)
    assert s["short"]["num_errors"] == 1 and s["short_during_long_prefill"]["num_requests"] == 1
    assert s["short"]["ttft_s"]["p50"] == pytest.approx(0.1)  # of 0.4, 0.1, 0.1: the refused one has none
    assert s["short"]["ttft_attainment"] == pytest.approx(3 / 4)
    # met: the long one (4 s <= 4 s) and the last short; not: 200 ms gap, 1.3 s gap, refused
    assert s["all"]["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput_requests_per_s"] == pytest.approx(2 / 8)
    assert s["throughput"]["requests_per_s"] == pytest.approx(4 / 8)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(13 / 8)
    assert s["throughput"]["prompt_tokens_per_s"] == pytest.approx(4300 / 8)
    assert s["energy"]["j_per_token"] == pytest.approx(1000 / 4313)
    assert s["energy"]["j_per_output_token"] == pytest.approx(1000 / 13)
    assert s["energy"]["mean_power_w"] == pytest.approx(125)
    t = s["target"]
    assert t["short_ttft_p99_during_long_s"] == pytest.approx(0.4)
    assert t["solo_ttft_p99_s"] == pytest.approx(0.199)
    assert t["ttft_ratio"] == pytest.approx(0.4 / 0.199)
    assert t["short_tbt_p99_during_long_s"] == pytest.approx(percentile([0.1, 0.2, 1.3, 0.1], 99))
    assert t["is_met"] is False
    table = format_table({"lars+adaptive": s})
    assert "target (missed)" in table and "2.01x solo" in table and "0.232 J/token" in table


def test_target_met_and_no_energy():
    long = _timing(4000, 1.0, [5.0, 5.1])
    short = _timing(100, 2.0, [2.15, 2.25, 2.3])
    s = summarize([long, short], [_timing(100, 0.0, [0.1, 0.2])], SLOS, duration_s=6.0, energy_j=None)
    assert s["target"]["ttft_ratio"] == pytest.approx(1.5) and s["target"]["is_met"] is True
    assert s["energy"]["joules"] is None
    assert "energy n/a" in format_table({"x": s}) and "target (met)" in format_table({"x": s})
    # nothing decoded beside the long prefill (the one gap ends after it): only the TTFT half counts
    waiting = _timing(100, 2.0, [2.1, 5.5])
    s = summarize([long, waiting], [_timing(100, 0.0, [0.1, 0.2])], SLOS, duration_s=6.0, energy_j=None)
    assert s["target"]["short_tbt_p99_during_long_s"] is None and s["target"]["ttft_ratio"] == pytest.approx(1)
    assert s["target"]["is_met"] is True
    late = _timing(100, 2.0, [2.3, 5.5])
    assert summarize([long, late], [_timing(100, 0.0, [0.1])], SLOS, 6.0, None)["target"]["is_met"] is False
    # without a long request there is nothing to compare
    alone = summarize([short], [], SLOS, duration_s=1.0, energy_j=None)
    assert alone["target"]["is_met"] is None and "target" not in format_table({"x": alone})


def test_max_gap_series_and_plot(tmp_path):
    timings, solo = _run()
    times, worst = max_gap_series(timings, num_buckets=8)  # 6.3 s over 8 buckets: 0.7875 s each
    assert len(times) == len(worst) and max(worst) == pytest.approx(1300)
    assert worst[times.index(max(times))] == pytest.approx(100)
    plot({"a": (timings, solo), "b": (timings[:2], [])}, SLOS, tmp_path / "serve.png", "test")
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"


def test_server_histograms_beside_the_clients_gaps():
    """The server's /metrics histograms, read around a replay: the share of steps and of API-process
    gaps at or under the largest bucket bound within the TBT SLO, printed beside the client's share."""
    from mnemosyne.bench.serve import parse_histograms

    text = "\n".join([
        "# TYPE mnemosyne_step_duration_seconds histogram",
        'mnemosyne_step_duration_seconds_bucket{le="0.1"} 8.0',
        'mnemosyne_step_duration_seconds_bucket{le="0.15"} 9.0',
        'mnemosyne_step_duration_seconds_bucket{le="0.2"} 10.0',
        'mnemosyne_step_duration_seconds_bucket{le="+Inf"} 10.0',
        'mnemosyne_step_duration_seconds_count 10.0',
        'mnemosyne_time_between_tokens_seconds_bucket{le="0.1"} 3.0',
        'mnemosyne_time_between_tokens_seconds_bucket{le="+Inf"} 4.0',
        'mnemosyne_time_to_first_token_seconds_bucket{le="0.1"} 5.0',
    ])
    histograms = parse_histograms(text)
    assert histograms == {"step": {0.1: 8.0, 0.15: 9.0, 0.2: 10.0, float("inf"): 10.0},
                          "tbt": {0.1: 3.0, float("inf"): 4.0}}
    assert parse_histograms("# nothing of ours\nother_bucket{le=\"1\"} 3") is None
    timings, solo = _run()
    s = summarize(timings, solo, SLOS, 8.0, None, histograms)  # TBT SLO 0.15 s
    assert s["server"]["step"] == {"count": 10.0, "bound_s": 0.15, "share": 0.9}
    assert s["server"]["tbt"] == {"count": 4.0, "bound_s": 0.1, "share": 0.75}  # 0.1 s: the largest bound <= SLO
    line = next(x for x in format_table({"x": s}).splitlines() if "server (/metrics" in x)
    assert "steps within 150.0ms 90.0% of 10" in line and "API-process TBT within 100.0ms 75.0% of 4" in line
    assert f"client TBT within SLO {s['all']['tbt_attainment']:.1%}" in line
    assert "server (/metrics" not in format_table({"x": summarize(timings, solo, SLOS, 8.0, None)})
