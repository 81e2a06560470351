"""`mnemosyne plan --validate`: predictions against measured TTFT and TBT, row by row.

The measurements file is a JSON list; each row is one run on the device:

    {"model": "dummy:llama-3.1-8b",        optional: else the command's MODEL
     "device": "h200",                     a --gpu name
     "layout": {"tp": 1, "pp": 2, "kvp": 2, "kvp_group_max_tokens": 524288},
                                           tp/pp/kvp default to 1; L defaults to ceil(context / kvp)
     "context": 1048576,                   prompt tokens (TTFT), or the KV context of the decode (TBT)
     "ttft_s": 121.4,                      measured TTFT in seconds, or null / absent
     "tbt_s": 0.0142,                      measured TBT in seconds at `context`, or null / absent
     "batch": 1,                           optional: decodes in the TBT step, each at `context`
     "chunking": "fixed:4096",             optional: the run's --chunking (default adaptive)
     "max_num_batched_tokens": 4096,       optional: the run's token cap (default: the engine's)
     "tbt_slo_ms": null,                   optional: the run's --tbt-slo-ms (adaptive chunking's budget)
     "sequence_pipelining": true,          optional: false for --no-sequence-pipelining
     "gpus_per_node": 8,                   optional
     "source": "..."}                      free text: date, command, commit (also "note", "command")
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.planner.hardware import Gpu
from mnemosyne.planner.interconnect import Interconnect
from mnemosyne.planner.predict import Candidate, group_tokens, latency_model, predict
from mnemosyne.planner.report import format_tokens
from mnemosyne.scheduler.latency_model import Layout, Profile

TOLERANCE = 0.10
"""The issue's bar: |predicted - measured| / measured <= 10%."""
_KNOWN = {"model", "device", "layout", "context", "ttft_s", "tbt_s", "batch", "chunking", "max_num_batched_tokens",
          "tbt_slo_ms", "sequence_pipelining", "gpus_per_node", "source", "note", "command", "date"}


@dataclass(frozen=True)
class Measurement:
    model: str | None
    device: str
    layout: Layout
    context: int
    ttft_s: float | None
    tbt_s: float | None
    batch: int = 1
    chunking: str = "adaptive"
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    tbt_slo_ms: float | None = None
    sequence_pipelining: bool = True
    gpus_per_node: int = 8

    @property
    def label(self) -> str:
        ly = self.layout
        return f"tp{ly.tp} pp{ly.pp} kvp{ly.kvp} @ {format_tokens(self.context)}"


@dataclass(frozen=True)
class Comparison:
    measurement: Measurement
    metric: str
    """ttft or tbt."""
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction: (predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    def within(self, tolerance: float = TOLERANCE) -> bool:
        return abs(self.error) <= tolerance


def load_measurements(path: str | Path) -> list[Measurement]:
    """Rows of a measurements file; raises ValueError naming the row at fault."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--validate {str(path)!r} cannot be read: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"--validate {str(path)!r}: expected a JSON list of measurements")
    return [_measurement(row, i) for i, row in enumerate(rows)]


def _measurement(row: Any, i: int) -> Measurement:
    where = f"measurement {i}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object")
    unknown = set(row) - _KNOWN
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    try:
        ly, context = row.get("layout", {}), int(row["context"])
        layout = Layout(int(ly.get("tp", 1)), int(ly.get("pp", 1)), int(ly.get("kvp", 1)), ly.get("kvp_group_max_tokens"))
        m = Measurement(row.get("model"), str(row["device"]), layout, context, _seconds(row.get("ttft_s")),
                        _seconds(row.get("tbt_s")), int(row.get("batch", 1)), row.get("chunking", "adaptive"),
                        int(row.get("max_num_batched_tokens", EngineConfig.max_num_batched_tokens)),
                        row.get("tbt_slo_ms"), bool(row.get("sequence_pipelining", True)),
                        int(row.get("gpus_per_node", 8)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: {e!r}") from e
    if m.ttft_s is None and m.tbt_s is None:
        raise ValueError(f"{where}: neither ttft_s nor tbt_s is given")
    if min(layout.tp, layout.pp, layout.kvp, context, m.batch) <= 0:
        raise ValueError(f"{where}: layout sizes, context and batch must be positive")
    return m


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a measured time must be a positive number of seconds, got {value!r}")
    return seconds


def compare(m: Measurement, model: ModelConfig, gpu: Gpu, net: Interconnect,
            profile: Profile | None = None) -> list[Comparison]:
    """The prediction for each figure the row measured."""
    layout = m.layout
    if layout.kvp > 1 and layout.kvp_group_max_tokens is None:
        layout = Layout(layout.tp, layout.pp, layout.kvp, group_tokens(layout, m.context))
    budget_s = None if m.tbt_slo_ms is None else m.tbt_slo_ms / 1e3
    candidate = Candidate(layout, budget_s, m.chunking, m.max_num_batched_tokens)
    out = []
    prediction = predict(model, gpu, net, candidate, m.context, profile, m.sequence_pipelining)
    if m.ttft_s is not None:
        out.append(Comparison(m, "ttft", m.ttft_s, prediction.ttft_s))
    if m.tbt_s is not None:
        tbt_s = prediction.tbt_s
        if m.batch > 1:  # the same step with more decodes: the eager overhead, if any, is unchanged
            lm = latency_model(model, gpu, net, layout, profile)
            tbt_s += lm.step_time_s([(1, m.context)] * m.batch) - lm.step_time_s([(1, m.context)])
        out.append(Comparison(m, "tbt", m.tbt_s, tbt_s))
    return out


def summary(comparisons: list[Comparison], tolerance: float = TOLERANCE) -> dict:
    errors = [abs(c.error) for c in comparisons]
    return {"num_rows": len(comparisons), "num_within": sum(c.within(tolerance) for c in comparisons),
            "tolerance": tolerance, "median_abs_error": statistics.median(errors) if errors else None,
            "max_abs_error": max(errors, default=None),
            "all_within": all(c.within(tolerance) for c in comparisons)}


def format_table(comparisons: list[Comparison], tolerance: float = TOLERANCE) -> str:
    lines = [f"{'row':<26} {'metric':<6} {'measured':>10} {'predicted':>10} {'error':>8}  verdict"]
    for c in comparisons:
        unit, scale = ("ms", 1e3) if c.metric == "tbt" else ("s", 1.0)
        lines.append(f"{c.measurement.label:<26} {c.metric:<6} {c.measured_s * scale:>8.2f}{unit:<2} "
                     f"{c.predicted_s * scale:>8.2f}{unit:<2} {c.error:>+7.1%}  "
                     f"{'ok' if c.within(tolerance) else f'MISS (>{tolerance:.0%})'}")
    s = summary(comparisons, tolerance)
    if comparisons:
        lines.append(f"{s['num_within']}/{s['num_rows']} within {tolerance:.0%}; median |error| "
                     f"{s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}")
    return "\n".join(lines)


def to_json(comparisons: list[Comparison], tolerance: float = TOLERANCE) -> dict:
    rows = [{"row": c.measurement.label, "metric": c.metric, "measured_s": c.measured_s,
             "predicted_s": c.predicted_s, "error": c.error, "within": c.within(tolerance)} for c in comparisons]
    return {"summary": summary(comparisons, tolerance), "rows": rows}
