"""The latency report on the CPU: a peer's shape without memory is a row that says so, not a crash,
and gets no speed-up line."""

from __future__ import annotations

import json
import math

from mnemosyne.bench.floors import Ceilings
from mnemosyne.bench.latency import Row, report


def test_a_peer_out_of_memory_is_reported_beside_the_engines_figures(tmp_path):
    ceilings = Ceilings(matmul_flops_per_s=800e12, copy_bytes_per_s=4e12)
    rows = [Row("mnemosyne", "prefill", 131072, 1, 10.5, 8.0),
            Row("mnemosyne", "prefill", 32768, 1, 1.3, 0.95),
            Row("hf", "prefill", 32768, 1, 1.5, 0.95),
            Row("hf", "prefill", 131072, 1, math.nan, 8.0, error="out of memory")]
    text = report(rows, ceilings, tmp_path, "test device")
    lines = text.splitlines()
    assert any(line.split()[:3] == ["hf", "prefill", "131072"] and "out of memory" in line for line in lines)
    assert any(line.split()[:3] == ["mnemosyne", "prefill", "131072"] and line.split()[-1] == "0.76"
               for line in lines)
    speed_ups = [line for line in lines if line.startswith("speed-up")]
    assert speed_ups == ["speed-up over hf, prefill context 32768 batch 1: 1.15x"]
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert [(r["error"], r["seconds"]) for r in saved["rows"]][2:] == [(None, 1.5), ("out of memory", None)]
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_each_prefill_gets_a_prompt_of_its_own():
    from mnemosyne.bench.latency import _prefill_prompt

    first, second = _prefill_prompt(1000, 256, 0), _prefill_prompt(1000, 256, 1)
    assert len(first) == len(second) == 256 and first != second
    assert _prefill_prompt(1000, 256, 0) == first  # and the same one from run to run
