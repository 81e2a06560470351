"""`mnemosyne plan` from the command line: token counts, the ranked table, the sweep, --validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemosyne.cli import main
from mnemosyne.planner.cli import parse_tokens

EXAMPLE = Path(__file__).with_name("measurements_example.json")
PROFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles" / "h200-llama-3-8b.json"


@pytest.mark.parametrize(("text", "tokens"), [
    ("262144", 262144), ("256K", 262144), ("256k", 262144), ("1M", 1 << 20), ("10M", 10 << 20),
    ("1.5M", 3 << 19), ("1_000_000", 1_000_000),
])
def test_context_accepts_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["", "M", "0", "-1K", "1.5", "ten", "1T"])
def test_bad_context_is_named(text):
    with pytest.raises(ValueError, match="--context"):
        parse_tokens(text)


def test_plan_prints_and_writes_ranked_layouts(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "llama-3-8b", "--context", "1M", "--gpus", "4", "--gpu", "h200", "--tbt-slo-ms", "50",
                 "--top", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted by `mnemosyne plan`" in text and "tp1 pp4 kvp1" in text and "more (--top)" in text
    result = json.loads(out.read_text())
    rows = result["ranked"]
    assert len(rows) == 6 and all(r["tp"] * r["pp"] * r["kvp"] == r["num_gpus"] == 4 for r in rows)
    assert all(r["step_budget_ms"] == 50 for r in rows)
    assert result["setup"]["interconnect"]["gpus_per_node"] == 8 and result["setup"]["tbt_slo_s"] == 0.05


def test_sweep_writes_the_best_layout_per_count_and_a_plot(tmp_path, capsys):
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert main(["plan", "dummy:llama-3-70b", "--context", "1M", "--sweep-gpus", "1,8,64", "--plot", str(png),
                 "-o", str(out)]) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert [s["num_gpus"] for s in sweep] == [1, 8, 64]
    assert sweep[0]["best"] is None  # 70B and 1M tokens of KV on one H100
    assert sweep[2]["best"]["ttft_s"] < sweep[1]["best"]["ttft_s"]
    assert png.stat().st_size > 10_000
    assert "(none fits" in capsys.readouterr().out


def test_validate_prints_each_row_and_fails_when_a_row_misses(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = main(["plan", "llama-3.1-8b", "--validate", str(EXAMPLE), "--tolerance", "1e-9", "-o", str(out)])
    assert rc == 1  # illustrative numbers are not predictions to 1e-9
    assert "MISS" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["summary"]["num_rows"] == 4
    assert main(["plan", "llama-3.1-8b", "--validate", str(EXAMPLE), "--tolerance", "100"]) == 0


def test_profile_must_match_the_gpu_and_calibrate_carries_it_over(capsys):
    assert main(["plan", "llama-3-8b", "--context", "64K", "--gpus", "1", "--gpu", "h100",
                 "--profile", str(PROFILE)]) == 2
    assert "use --calibrate" in capsys.readouterr().err
    assert main(["plan", "llama-3-8b", "--context", "64K", "--gpus", "1", "--gpu", "h100",
                 "--calibrate", str(PROFILE)]) == 0
    assert "roofline calibrated on" in capsys.readouterr().out
    assert main(["plan", "llama-3-70b", "--context", "64K", "--gpus", "8", "--gpu", "h200",
                 "--profile", str(PROFILE)]) == 2
    assert "another shape" in capsys.readouterr().err


def test_plan_needs_a_context_and_a_gpu_count(capsys):
    assert main(["plan", "llama-3-8b", "--gpus", "4"]) == 2
    assert main(["plan", "llama-3-8b", "--context", "1M"]) == 2
    assert main(["plan", "llama-3-8b", "--context", "1M", "--gpus", "4", "--gpu", "a100"]) == 2
    assert "--gpu must be one of" in capsys.readouterr().err
