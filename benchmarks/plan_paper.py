"""The paper's settings, predicted by `mnemosyne plan` (nothing here is measured): Llama-3-8B and
Llama-3-70B shapes, 1M to 10M-token prompts, 1 to 128 H100s in nodes of 8 (NVLink inside, InfiniBand
between), the nominal H100 roofline unless --calibrate is given.

For each (model, context, GPU count) it records the best layout by TTFT, without an SLO and under
the paper's 30 ms TBT SLO (which is then also adaptive chunking's step budget), and the best decode
TBT. It also records the SPP series the paper's scaling figure is about: tp=8 (one node per stage),
pp = 1..16 (8..128 GPUs), kvp=1, whose efficiency is TTFT(pp=1) / (pp × TTFT(pp)); its timings are
kept where the KV would not fit, as the paper's scaling is a timing figure.

    python benchmarks/plan_paper.py [--calibrate PROFILE] [-o benchmarks/results/plan-paper-h100]

Writes PREFIX.json and PREFIX.png and prints the tables that go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.planner.hardware import GPUS, calibrate
from mnemosyne.planner.interconnect import Interconnect
from mnemosyne.planner.predict import Candidate, predict
from mnemosyne.planner.report import PREDICTED, format_tokens, plot_ttft_vs_gpus, to_row
from mnemosyne.planner.search import Search, Slos, best_per_count
from mnemosyne.scheduler.latency_model import Layout, Profile

MODELS = ("llama-3-8b", "llama-3-70b")
CONTEXTS = (1 << 20, 2 << 20, 4 << 20, 10 << 20)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
SPP_STAGES = (1, 2, 4, 8, 16)
TBT_SLO_S = 0.030
"""The paper's production TBT SLO."""
HOST_BOUND_STAGE_S = 2.7e-3
"""Sensitivity: every stage pays, per micro-batch, the whole fixed cost of an eager step measured in the
H200 profile (a 16-token step, 6.58 ms, less its 3.9 ms weight read), instead of a 0.3 ms dispatch."""


def gpu_for(calibration_path: str | None):
    gpu = GPUS["h100"]
    if not calibration_path:
        return gpu, f"nominal h100 roofline ({gpu.device.flops_efficiency:.2f} of peak FLOP/s, " \
                    f"{gpu.device.bandwidth_efficiency:.2f} of HBM bandwidth)"
    profile = Profile.load(calibration_path)
    cal = calibrate(profile, PRESETS[profile.model.removeprefix("dummy:")], GPUS["h200"].device, calibration_path)
    return replace(gpu, device=cal.apply(gpu.device)), f"h100 roofline calibrated on {calibration_path}"


def spp_series(model_name: str, context: int, gpu, net: Interconnect, budget_s: float | None,
               max_tokens: int) -> list[dict]:
    model = PRESETS[model_name]
    rows = []
    for pp in SPP_STAGES:
        p = predict(model, gpu, net, Candidate(Layout(8, pp, 1), budget_s, "adaptive", max_tokens), context)
        rows.append({"num_gpus": 8 * pp, "pp": pp, "ttft_s": p.ttft_s, "ttft_no_spp_s": p.ttft_no_spp_s,
                     "tbt_s": p.tbt_s, "fits": p.memory.fits})
    base = rows[0]["ttft_s"]
    for r in rows:
        r["spp_efficiency"] = base / (r["pp"] * r["ttft_s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", help="fit the roofline's efficiencies to this profile")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token cap (the engine's default)")
    parser.add_argument("-o", "--out-prefix", default="benchmarks/results/plan-paper-h100")
    args = parser.parse_args()
    gpu, source = gpu_for(args.calibrate)
    net = Interconnect()
    cap = args.max_num_batched_tokens
    result = {"note": PREDICTED, "step_time_model": source, "gpu": gpu.device.name, "interconnect": net.__dict__,
              "max_num_batched_tokens": cap, "tbt_slo_s": TBT_SLO_S, "best": [], "spp": []}
    for name in MODELS:
        model = PRESETS[name]
        for context in CONTEXTS:
            free = best_per_count(Search(model, gpu, net, context, max_num_batched_tokens=cap), GPU_COUNTS)
            slo = best_per_count(Search(model, gpu, net, context, Slos(tbt_s=TBT_SLO_S), (TBT_SLO_S,),
                                        max_num_batched_tokens=cap), GPU_COUNTS)
            tbt = best_per_count(Search(model, gpu, net, context, max_num_batched_tokens=cap), GPU_COUNTS, "tbt")
            for n in GPU_COUNTS:
                result["best"].append({"model": name, "context": context, "num_gpus": n,
                                       "by_ttft": _row(free[n]), "by_ttft_tbt_slo": _row(slo[n]),
                                       "by_tbt": _row(tbt[n])})
            for budget in (None, TBT_SLO_S):
                result["spp"].append({"model": name, "context": context, "step_budget_s": budget,
                                      "stage_host_s": gpu.stage_dispatch_s,
                                      "rows": spp_series(name, context, gpu, net, budget, cap)})
                host_bound = replace(gpu, stage_dispatch_s=HOST_BOUND_STAGE_S)
                result["spp"].append({"model": name, "context": context, "step_budget_s": budget,
                                      "stage_host_s": HOST_BOUND_STAGE_S,
                                      "rows": spp_series(name, context, host_bound, net, budget, cap)})
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, prefix.with_suffix(".png"))
    print(f"{PREDICTED}; {source}; token cap {cap}")
    print(format_tables(result))


def _row(verdict) -> dict | None:
    return None if verdict is None else to_row(verdict)


def _plot(result: dict, path: Path) -> None:
    series, efficiency = {}, {}
    for entry in result["best"]:
        if entry["by_ttft"] is not None:
            label = f"{entry['model']}, {format_tokens(entry['context'])}"
            series.setdefault(label, []).append((entry["num_gpus"], entry["by_ttft"]["ttft_s"]))
    for s in result["spp"]:
        budget = "no step budget" if s["step_budget_s"] is None else f"{s['step_budget_s'] * 1e3:g} ms budget"
        host = "" if s["stage_host_s"] < HOST_BOUND_STAGE_S else f", {HOST_BOUND_STAGE_S * 1e3:g} ms host/stage"
        if s["model"] == "llama-3-8b" and s["context"] in (1 << 20, 10 << 20):
            label = f"8B, {format_tokens(s['context'])}, tp8 × pp, {budget}{host}"
            efficiency[label] = [(r["num_gpus"], r["spp_efficiency"]) for r in s["rows"]]
    plot_ttft_vs_gpus(series, path, "best layout per GPU count, H100 (predicted)", efficiency)


def format_tables(result: dict) -> str:
    lines = ["", "Best layout by TTFT (no SLO) | under the 30 ms TBT SLO | best decode TBT:",
             f"{'model':<12} {'context':>7} {'GPUs':>5} {'layout':<14} {'TTFT':>9} {'TBT':>8} "
             f"{'layout (SLO)':<14} {'TTFT':>9} {'best-TBT layout':<16} {'TBT':>7}"]
    for e in result["best"]:
        a, b, c = e["by_ttft"], e["by_ttft_tbt_slo"], e["by_tbt"]
        lines.append(f"{e['model']:<12} {format_tokens(e['context']):>7} {e['num_gpus']:>5} "
                     f"{_layout(a):<14} {_ttft(a):>9} {_tbt(a):>8} {_layout(b):<14} {_ttft(b):>9} "
                     f"{_layout(c):<16} {_tbt(c):>7}")
    lines += ["", "SPP series, tp=8, kvp=1 (efficiency = TTFT(pp=1) / (pp × TTFT(pp)); * = KV would not fit):",
              f"{'model':<12} {'context':>7} {'budget':>7} {'host':>6} "
              + " ".join(f"{'pp=' + str(p):>16}" for p in SPP_STAGES)]
    for s in result["spp"]:
        budget = "-" if s["step_budget_s"] is None else f"{s['step_budget_s'] * 1e3:g}ms"
        cells = " ".join(f"{_ttft(r):>8} {r['spp_efficiency']:>5.0%}{'' if r['fits'] else '*':1}" for r in s["rows"])
        lines.append(f"{s['model']:<12} {format_tokens(s['context']):>7} {budget:>7} "
                     f"{s['stage_host_s'] * 1e3:>4.1f}ms {cells}")
    return "\n".join(lines)


def _layout(row: dict | None) -> str:
    return "-" if row is None else f"tp{row['tp']} pp{row['pp']} kvp{row['kvp']}"


def _ttft(row: dict | None) -> str:
    if row is None:
        return "-"
    s = row["ttft_s"]
    return f"{s / 60:.1f}min" if s >= 600 else f"{s:.1f}s"


def _tbt(row: dict | None) -> str:
    return "-" if row is None else f"{row['tbt_s'] * 1e3:.1f}ms"


if __name__ == "__main__":
    main()
