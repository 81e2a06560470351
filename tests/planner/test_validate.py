"""`plan --validate`: the measurements format, and the error arithmetic of each row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.planner.hardware import GPUS
from mnemosyne.planner.interconnect import Interconnect
from mnemosyne.planner.predict import Candidate, predict
from mnemosyne.planner.validate import Comparison, compare, format_table, load_measurements, summary, to_json
from mnemosyne.scheduler.latency_model import Layout

EXAMPLE = Path(__file__).with_name("measurements_example.json")
LLAMA_31_8B = PRESETS["llama-3.1-8b"]
H200 = GPUS["h200"]


def test_the_example_file_loads_with_its_defaults():
    rows = load_measurements(EXAMPLE)
    assert [r.layout.pp for r in rows] == [2, 2, 1]
    assert rows[1].layout.kvp_group_max_tokens == 524288 and rows[1].ttft_s == 200.0 and rows[1].tbt_s == 0.025
    assert rows[2].model is None and rows[2].layout.kvp == 4 and rows[2].ttft_s is None
    assert rows[2].chunking == "adaptive" and rows[2].max_num_batched_tokens == 2048  # the engine's default


def test_each_row_compares_the_prediction_of_its_own_settings():
    row = load_measurements(EXAMPLE)[1]
    [ttft, tbt] = compare(row, LLAMA_31_8B, H200, Interconnect())
    expected = predict(LLAMA_31_8B, H200, Interconnect(),
                       Candidate(Layout(1, 2, 2, 524288), None, "fixed:4096", 4096), 1 << 20)
    assert (ttft.metric, ttft.measured_s, ttft.predicted_s) == ("ttft", 200.0, expected.ttft_s)
    assert (tbt.metric, tbt.measured_s, tbt.predicted_s) == ("tbt", 0.025, expected.tbt_s)
    # L defaults to the smallest split of the context
    [only] = compare(load_measurements(EXAMPLE)[2], LLAMA_31_8B, H200, Interconnect())
    assert only.predicted_s == predict(LLAMA_31_8B, H200, Interconnect(),
                                       Candidate(Layout(1, 1, 4, 1 << 19)), 1 << 21).tbt_s


def test_error_is_relative_to_the_measurement_and_the_verdict_uses_the_tolerance():
    row = load_measurements(EXAMPLE)[0]
    over = Comparison(row, "ttft", 10.0, 10.9)
    under = Comparison(row, "ttft", 10.0, 8.5)
    assert over.error == pytest.approx(0.09) and over.within(0.10)
    assert under.error == pytest.approx(-0.15) and not under.within(0.10) and under.within(0.2)
    s = summary([over, under])
    assert s["num_within"] == 1 and s["num_rows"] == 2 and not s["all_within"]
    assert s["median_abs_error"] == pytest.approx(0.12) and s["max_abs_error"] == pytest.approx(0.15)
    table = format_table([over, under])
    assert "+9.0%" in table and "-15.0%" in table and "MISS" in table and "1/2 within 10%" in table
    assert to_json([over])["rows"][0]["within"] is True


def test_batched_tbt_rows_predict_the_larger_step():
    row = load_measurements(EXAMPLE)[2]
    single = compare(row, LLAMA_31_8B, H200, Interconnect())[0].predicted_s
    batched = compare(type(row)(**{**row.__dict__, "batch": 4, "context": 1 << 18}), LLAMA_31_8B, H200,
                      Interconnect())[0].predicted_s
    alone = compare(type(row)(**{**row.__dict__, "context": 1 << 18}), LLAMA_31_8B, H200, Interconnect())[0]
    assert batched > alone.predicted_s and single > alone.predicted_s


@pytest.mark.parametrize(("row", "message"), [
    ({"device": "h200", "context": 1000}, "neither ttft_s nor tbt_s"),
    ({"device": "h200", "context": 1000, "ttft_s": -1}, "positive number of seconds"),
    ({"device": "h200", "ttft_s": 1.0}, "context"),
    ({"device": "h200", "context": 1000, "ttft_s": 1.0, "speed": 3}, "unknown fields"),
    ({"device": "h200", "context": 1000, "ttft_s": 1.0, "layout": {"pp": 0}}, "must be positive"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"device": "h200", "context": 10, "tbt_s": 0.01}, row]))
    with pytest.raises(ValueError, match=f"measurement 1.*{message}|{message}"):
        load_measurements(path)


def test_a_file_that_is_not_a_list_is_refused(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        load_measurements(path)
