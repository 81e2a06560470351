"""A real run on one GPU: one long prompt among Poisson chat requests, through the engine at wall-clock
arrival times, under LARS + adaptive chunking and under FCFS + fixed:2048; then the simulator on the
same trace with the measured profile, so predicted and measured TTFT/TBT sit side by side. Each
measured step is also put beside the step-time model's prediction for its batch: the prediction error
by kind of step, the slowest steps with their chunks, and every step, land in steps.json.

    PYTHONPATH=src python3 benchmarks/sim/gpu_mixed.py --profile PROFILE.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import Request, SamplingParams
from mnemosyne.scheduler.factory import layout_of
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, build_latency_model, detect_device
from mnemosyne.scheduler.policy import Deadlines
from mnemosyne.sim.report import summarize
from mnemosyne.sim.simulator import SimResult, StepSeries, simulate
from mnemosyne.sim.trace import MixedWorkload, TraceRequest

RUNS = [("lars", "adaptive", 16384), ("fcfs", "fixed:2048", 2048)]


def workload(long_tokens: int, duration_s: float, rate: float) -> list[TraceRequest]:
    chats = MixedWorkload(num_requests=int(duration_s * rate), rate_per_s=rate, long_fraction=0.0,
                          short_prompt_tokens=(128, 2048), output_tokens=(64, 256), seed=7).generate()
    return sorted([TraceRequest(1.0, long_tokens, 64), *chats], key=lambda r: r.arrival_s)


def run_engine(config: EngineConfig, trace: list[TraceRequest], latency: LatencyModel,
               step_log: list[dict]) -> SimResult:
    """Play the trace in real time; every request's metrics, as the engine recorded them. Each step
    is appended to step_log: its start, measured and predicted time, decodes and (new, prefix) chunks."""
    engine = LLMEngine(config)
    vocab = engine.model_config.vocab_size
    engine.add_request([5] * 512, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    requests: list[Request] = []
    steps = StepSeries()
    start = time.monotonic()
    next_report_s = 10.0
    while len(requests) < len(trace) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        if now >= next_report_s:  # progress, so a run cut short by a timeout still shows where it was
            next_report_s += 10.0
            long = [r for r in requests if r.num_prompt_tokens > 32768]
            print(f"  [{now:5.0f} s] {sum(r.is_finished for r in requests)}/{len(trace)} requests done, "
                  f"{len(step_log)} steps, last {step_log[-1]['step_s'] * 1e3 if step_log else 0:.0f} ms, factor "
                  f"{step_log[-1]['factor'] if step_log else 1:.2f}; long prompt "
                  f"{long[0].num_computed_tokens if long else 0}/{long[0].num_prompt_tokens if long else 0}",
                  flush=True)
        while len(requests) < len(trace) and trace[len(requests)].arrival_s <= now:
            spec = trace[len(requests)]
            prompt = [(7 * i + len(requests)) % (vocab - 3) + 3 for i in range(spec.num_prompt_tokens)]
            rid = engine.add_request(prompt, SamplingParams(max_tokens=spec.num_output_tokens, ignore_eos=True),
                                     arrival_s=start + spec.arrival_s)
            requests.append(engine.scheduler.requests[rid])
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, trace[len(requests)].arrival_s - now))
            continue
        t0 = time.monotonic()
        engine.step()
        plan = engine.last_plan
        if plan is not None and plan.chunks:
            step_s = time.monotonic() - t0
            steps.record(t0 - start, step_s, plan, engine.scheduler)
            chunks = [(c.num_new_tokens, c.start) for c in plan.chunks]
            step_log.append({"start_s": round(t0 - start, 4), "step_s": step_s,
                             "predicted_s": latency.step_time_s(chunks),
                             "decodes": sum(1 for n, _ in chunks if n == 1),
                             "factor": getattr(getattr(engine.scheduler.chunking, "feedback", None), "factor", 1.0),
                             "chunks": [[n, p] for n, p in chunks if n > 1]})
    num_preemptions = engine.scheduler.num_preemptions
    engine.shutdown()
    return SimResult(requests, steps, num_preemptions, time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="from `mnemosyne profile` on this GPU")
    parser.add_argument("--model", default="dummy:llama-3.1-8b", help="same shapes as the profile")
    parser.add_argument("--long-tokens", type=int, default=131072)
    parser.add_argument("--duration-s", type=float, default=60.0, help="span of the chat arrivals")
    parser.add_argument("--rate", type=float, default=4.0, help="chat arrivals per second")
    parser.add_argument("--tbt-slo-ms", type=float, default=50.0)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="out")
    parser.add_argument("--runs", default="lars,fcfs", help="which of lars, fcfs to run")
    parser.add_argument("--cudnn-ragged", choices=["auto", "on", "off"], default="auto",
                        help="cuDNN's ragged path (auto: on, as with any --tbt-slo-ms)")
    parser.add_argument("--triton-chunk-rows", type=int, default=None,
                        help="query rows per kv head up to which a chunk goes to the Triton chunk kernel "
                             "(default: the engine's, 8192 under a TBT SLO)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = workload(args.long_tokens, args.duration_s, args.rate)
    base = EngineConfig(model=args.model, device=args.device, tbt_slo_ms=args.tbt_slo_ms, ttft_slo_ms=args.ttft_slo_ms,
                        latency_profile=args.profile, max_model_len=args.long_tokens + 4096,
                        cudnn_ragged={"auto": None, "on": True, "off": False}[args.cudnn_ragged],
                        triton_chunk_rows=args.triton_chunk_rows)
    rows, step_rows = {}, {}
    print(f"| run | short TTFT p50 | short TTFT p99 | long TTFT | TBT p50 | TBT p99 | TBT max |\n|{'---|' * 7}",
          flush=True)
    for scheduler, chunking, cap in RUNS:
        if scheduler not in args.runs.split(","):
            continue
        config = replace(base, scheduler=scheduler, chunking=chunking, max_num_batched_tokens=cap)
        device = detect_device(args.device)
        latency = build_latency_model(config_model(config), layout_of(config), device, args.profile)
        deadlines = Deadlines(latency.prefill_work_s, args.ttft_slo_ms / 1e3, config.deadline_work_factor)
        step_log: list[dict] = []
        measured = run_engine(config, trace, latency, step_log)
        step_rows[f"{scheduler}+{chunking}"] = step_report(step_log)
        (out / "steps.json").write_text(json.dumps(step_rows, indent=1) + "\n")
        predicted = simulate(trace, config, config_model(config), latency, DEVICES[device])
        for name, result in (("measured", measured), ("predicted", predicted)):
            summary = summarize(result, deadlines.deadline_s, args.tbt_slo_ms / 1e3, long_threshold=min(32768, args.long_tokens))
            summary.pop("series")
            rows[f"{scheduler}+{chunking} {name}"] = summary
            print_row(f"{scheduler}+{chunking} {name}", summary)  # as each run ends: a killed job still reports
        (out / "gpu_mixed.json").write_text(json.dumps(rows, indent=1) + "\n")


def step_report(step_log: list[dict], slowest: int = 25) -> dict:
    """Prediction error (measured / predicted - 1) per kind of step, the slowest steps, and every step
    (as rows, to replay the feedback or a changed model against them)."""
    def kind(step: dict) -> str:
        return "mixed" if step["decodes"] and step["chunks"] else "chunks" if step["chunks"] else "decode"

    errors: dict[str, list[float]] = {}
    for step in step_log:
        errors.setdefault(kind(step), []).append(step["step_s"] / step["predicted_s"] - 1)
    quantiles = {}
    for name, values in errors.items():
        values.sort()
        quantiles[name] = {"n": len(values), **{f"p{q}": values[min(len(values) - 1, len(values) * q // 100)]
                                                 for q in (10, 50, 90, 99)}}
    print("step time / predicted - 1: " + "; ".join(
        f"{k} (n={v['n']}) p50 {v['p50']:+.0%} p90 {v['p90']:+.0%} p99 {v['p99']:+.0%}" for k, v in quantiles.items()),
        flush=True)
    slow = sorted(step_log, key=lambda s: -s["step_s"])[:slowest]
    for step in slow[:5]:
        print(f"  slow step at {step['start_s']:.2f} s: {step['step_s'] * 1e3:.0f} ms (predicted "
              f"{step['predicted_s'] * 1e3:.0f}), {step['decodes']} decodes, chunks (new, prefix) "
              f"{step['chunks'][:6]}", flush=True)
    every = [[s["start_s"], round(s["step_s"], 5), round(s["predicted_s"], 5), s["decodes"], round(s["factor"], 3),
              s["chunks"]] for s in step_log]
    return {"error": quantiles, "slowest": slow,
            "steps": {"columns": ["start_s", "step_s", "predicted_s", "decodes", "factor", "chunks"], "rows": every}}


def print_row(name: str, s: dict) -> None:
    print(f"| {name} | {s['short']['ttft_s']['p50']:.3f} s | {s['short']['ttft_s']['p99']:.3f} s | "
          f"{s['long']['ttft_s']['max']:.2f} s | {s['all']['tbt_s']['p50'] * 1e3:.1f} ms | "
          f"{s['all']['tbt_s']['p99'] * 1e3:.1f} ms | {s['all']['tbt_s']['max'] * 1e3:.0f} ms |", flush=True)


def config_model(config: EngineConfig):
    from mnemosyne.models.loaders import resolve_model

    return resolve_model(config.model, seed=config.seed).load_config()


if __name__ == "__main__":
    main()
