"""Simulator study (roofline, predicted, not measured): the engine's scheduler on a virtual clock,
Llama-3.1-8B shapes on 8 H100s (tp=8), over a Poisson mix of chat requests and a few 128K-1M
prompts. Compares policies (FCFS, EDF, LRS, LARS) and chunking (adaptive vs fixed:N).

    python benchmarks/sim/run.py [--num-requests 1000] [--out benchmarks/sim]

Writes results.json, pareto.png and one timeline PNG per headline run, and prints the tables
that go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnemosyne.config import EngineConfig
from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.scheduler.factory import layout_of
from mnemosyne.scheduler.latency_model import DEVICES, build_latency_model
from mnemosyne.scheduler.policy import Deadlines
from mnemosyne.sim.report import plot, summarize
from mnemosyne.sim.simulator import simulate
from mnemosyne.sim.trace import MixedWorkload, save_trace

MODEL = "llama-3.1-8b"
DEVICE = "h100"
TBT_SLO_MS = 50.0
TTFT_SLO_MS = 2000.0
ADAPTIVE_TOKEN_CAP = 16384
LONG_THRESHOLD = 32768
RUNS = [("fcfs", "fixed:2048"), ("fcfs", "adaptive"), ("edf", "adaptive"), ("lrs", "adaptive"),
        ("lars", "adaptive"), ("lars", "fixed:256"), ("lars", "fixed:512"), ("lars", "fixed:1024"),
        ("lars", "fixed:2048")]
TIMELINES = {("lars", "adaptive"), ("fcfs", "fixed:2048"), ("lars", "fixed:2048")}


def config(scheduler: str, chunking: str) -> EngineConfig:
    cap = int(chunking.split(":")[1]) if chunking.startswith("fixed:") else ADAPTIVE_TOKEN_CAP
    return EngineConfig(model=f"dummy:{MODEL}", tensor_parallel_size=8, scheduler=scheduler, chunking=chunking,
                        tbt_slo_ms=TBT_SLO_MS, ttft_slo_ms=TTFT_SLO_MS, max_num_batched_tokens=cap,
                        roofline_device=DEVICE, max_model_len=1 << 21)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    parser.add_argument("--long-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = PRESETS[MODEL]
    workload = MixedWorkload(args.num_requests, args.rate, args.long_fraction, seed=args.seed)
    trace = workload.generate()
    save_trace(out / "trace.jsonl", trace)
    results = {}
    for scheduler, chunking in RUNS:
        cfg = config(scheduler, chunking)
        latency = build_latency_model(model, layout_of(cfg), DEVICE)
        result = simulate(trace, cfg, model, latency, DEVICES[DEVICE])
        deadlines = Deadlines(latency.prefill_work_s, TTFT_SLO_MS / 1e3, cfg.deadline_work_factor)
        summary = summarize(result, deadlines.deadline_s, TBT_SLO_MS / 1e3, LONG_THRESHOLD)
        name = f"{scheduler}+{chunking}"
        if (scheduler, chunking) in TIMELINES:
            plot(result, summary, out / f"timeline_{scheduler}_{chunking.replace(':', '')}.png",
                 f"{MODEL} on 8x H100 (tp=8, roofline): {name}", TBT_SLO_MS / 1e3)
        else:
            summary.pop("series")
        results[name] = summary
        print(f"{name:<16} simulated in {summary['sim_wall_s']:.1f}s", flush=True)
    setup = {"model": MODEL, "device": DEVICE, "layout": "tp=8 (8 GPUs)", "tbt_slo_ms": TBT_SLO_MS,
             "ttft_slo_ms": TTFT_SLO_MS, "deadline_work_factor": 3.0, "adaptive_token_cap": ADAPTIVE_TOKEN_CAP,
             "long_threshold_tokens": LONG_THRESHOLD, "workload": vars(workload) | {"num_long": sum(
                 r.num_prompt_tokens >= LONG_THRESHOLD for r in trace)}}
    (out / "results.json").write_text(json.dumps({"setup": setup, "runs": results}, indent=1, default=str) + "\n")
    pareto(results, out / "pareto.png")
    print(tables(results, setup))


def pareto(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, s in results.items():
        if not name.startswith("lars+"):
            continue
        marker = "*" if name.endswith("adaptive") else "o"
        label = name.removeprefix("lars+")
        for i, cls in enumerate(("long", "short")):
            ttft = s[cls]["ttft_s"]["p50" if cls == "long" else "p99"]
            ax[i].scatter(s["all"]["tbt_s"]["p99"] * 1e3, ttft, marker=marker, s=120 if marker == "*" else 50)
            ax[i].annotate(label, (s["all"]["tbt_s"]["p99"] * 1e3, ttft), textcoords="offset points", xytext=(6, 4))
    for i, title in enumerate(("long requests: median TTFT", "short requests: p99 TTFT")):
        ax[i].axvline(TBT_SLO_MS, color="r", ls="--", lw=1, label="TBT SLO")
        ax[i].set(xscale="log", xlabel="p99 TBT (ms)", ylabel="TTFT (s)", title=title)
        ax[i].legend()
    fig.suptitle("LARS: adaptive vs fixed chunks (Llama-3.1-8B, 8x H100 tp=8, roofline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(results: dict, setup: dict) -> str:
    lines = ["| run | short TTFT p50 | short TTFT p99 | long TTFT p50 | long TTFT max | TBT p50 | TBT p99 "
             "| TTFT SLO met | TBT SLO met | output tok/s |", "|" + "---|" * 10]
    for name, s in results.items():
        short, long, every = s["short"], s["long"], s["all"]
        lines.append(
            f"| {name} | {short['ttft_s']['p50']:.2f} s | {short['ttft_s']['p99']:.2f} s | "
            f"{long['ttft_s']['p50']:.1f} s | {long['ttft_s']['max']:.1f} s | {every['tbt_s']['p50'] * 1e3:.1f} ms | "
            f"{every['tbt_s']['p99'] * 1e3:.1f} ms | {every['ttft_attainment']:.1%} | {every['tbt_attainment']:.1%} | "
            f"{s['throughput']['output_tokens_per_s']:.0f} |")
    lars, fcfs, fcfs_fixed = results["lars+adaptive"], results["fcfs+adaptive"], results["fcfs+fixed:2048"]
    fixed = results["lars+fixed:2048"]
    lines += [
        "",
        f"- short p99 TTFT, FCFS / LARS (both adaptive): {fcfs['short']['ttft_s']['p99'] / lars['short']['ttft_s']['p99']:.0f}x; "
        f"FCFS+fixed:2048 / LARS+adaptive: {fcfs_fixed['short']['ttft_s']['p99'] / lars['short']['ttft_s']['p99']:.0f}x",
        f"- p99 TBT: adaptive {lars['all']['tbt_s']['p99'] * 1e3:.1f} ms, fixed:2048 "
        f"{fixed['all']['tbt_s']['p99'] * 1e3:.1f} ms (SLO {setup['tbt_slo_ms']:.0f} ms)",
        f"- long TTFT, adaptive / fixed:2048 (LARS): p50 {lars['long']['ttft_s']['p50'] / fixed['long']['ttft_s']['p50']:.3f}, "
        f"mean {lars['long']['ttft_s']['mean'] / fixed['long']['ttft_s']['mean']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
