"""`mnemosyne simulate` flags and entry point. Imported when the CLI builds its parser, so nothing
heavy is imported at module level."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_trace_arguments(p: argparse.ArgumentParser, num_requests: int = 1000, rate: float = 1.0,
                        long_fraction: float = 0.02) -> None:
    """The trace flags, shared with `mnemosyne bench serve` so that both can run the same trace."""
    src = p.add_argument_group("trace (a file, or a generated Poisson mix of short and long requests)")
    src.add_argument("--trace", help="JSONL: arrival_s, num_prompt_tokens, num_output_tokens per line")
    src.add_argument("--num-requests", type=int, default=num_requests,
                     help=f"generated requests (default: {num_requests})")
    src.add_argument("--rate", type=float, default=rate, help=f"generated arrivals per second (default: {rate})")
    src.add_argument("--long-fraction", type=float, default=long_fraction,
                     help=f"share of long prompts among the generated requests (default: {long_fraction})")
    src.add_argument("--long-at-s", default="",
                     help="also a long request at each of these times, in seconds (comma-separated)")
    src.add_argument("--long-prompt-tokens", default="131072,1048576", help="long prompt range MIN,MAX")
    src.add_argument("--short-prompt-tokens", default="128,4096", help="short prompt range MIN,MAX")
    src.add_argument("--output-tokens", default="32,512", help="output length range MIN,MAX")
    src.add_argument("--trace-seed", type=int, default=0, help="seed of the generated trace (default: 0)")
    src.add_argument("--save-trace", help="write the trace used here as JSONL")


def trace_from_args(args: argparse.Namespace) -> list:
    """The --trace file, or the generated mix (with --long-at-s requests); written to --save-trace."""
    from mnemosyne.sim.trace import MixedWorkload, load_trace, save_trace, with_long_requests

    if args.trace:
        trace = load_trace(args.trace)
    else:
        long_tokens = _range(args.long_prompt_tokens, "--long-prompt-tokens")
        output_tokens = _range(args.output_tokens, "--output-tokens")
        trace = MixedWorkload(args.num_requests, args.rate, args.long_fraction, long_tokens,
                              _range(args.short_prompt_tokens, "--short-prompt-tokens"), output_tokens,
                              args.trace_seed).generate()
        try:
            long_at_s = [float(t) for t in args.long_at_s.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--long-at-s must be seconds separated by commas, got {args.long_at_s!r}") from None
        trace = with_long_requests(trace, long_at_s, long_tokens, output_tokens, args.trace_seed)
    if not trace:
        raise ValueError("the trace has no requests")
    if args.save_trace:
        save_trace(args.save_trace, trace)
    return trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p)
    out = p.add_argument_group("report")
    out.add_argument("--long-threshold", type=int, default=32768,
                     help="prompts of at least this many tokens are reported as long (default: 32768)")
    out.add_argument("-o", "--output", help="write the report as JSON")
    out.add_argument("--plot", help="write a PNG of step times, TTFT, TBT and queues")
    p.set_defaults(func=run, roofline_device="h100")


def _range(text: str, flag: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be MIN,MAX, got {text!r}") from None
    if not 0 < low <= high:
        raise ValueError(f"{flag} must be MIN,MAX with 0 < MIN <= MAX, got {text!r}")
    return low, high


def run(args: argparse.Namespace) -> int:
    from mnemosyne.cli import engine_config
    from mnemosyne.models.loaders import resolve_model
    from mnemosyne.scheduler.factory import layout_of
    from mnemosyne.scheduler.latency_model import build_latency_model, device_spec
    from mnemosyne.scheduler.policy import Deadlines
    from mnemosyne.sim.report import plot, summarize
    from mnemosyne.sim.simulator import simulate

    config = engine_config(args)
    device = "h100" if config.roofline_device == "auto" else config.roofline_device
    model = resolve_model(config.model, seed=config.seed).load_config()
    trace = trace_from_args(args)
    latency = build_latency_model(model, layout_of(config), device, config.latency_profile)
    result = simulate(trace, config, model, latency, device_spec(device))
    ttft_slo_s = None if config.ttft_slo_ms is None else config.ttft_slo_ms / 1e3
    tbt_slo_s = None if config.tbt_slo_ms is None else config.tbt_slo_ms / 1e3
    deadlines = Deadlines(latency.prefill_work_s, ttft_slo_s, config.deadline_work_factor)
    summary = summarize(result, deadlines.deadline_s, tbt_slo_s, args.long_threshold)
    summary["setup"] = {"model": config.model, "device": device, "num_gpus": config.world_size,
                        "tp": config.tensor_parallel_size, "pp": config.pipeline_parallel_size,
                        "kvp": config.kv_parallel_size, "scheduler": config.scheduler, "chunking": config.chunking,
                        "tbt_slo_ms": config.tbt_slo_ms, "ttft_slo_ms": config.ttft_slo_ms,
                        "latency": config.latency_profile or f"roofline ({device})"}
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot(result, summary, args.plot, f"{config.model} on {config.world_size}× {device}, {config.scheduler} "
             f"+ {config.chunking}", tbt_slo_s)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    from mnemosyne.bench.serve_report import format_ms, format_pct  # with numpy: not at the CLI's start-up

    lines = [f"{'class':<6} {'n':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TBT p50':>8} {'TBT p99':>8} "
             f"{'E2E p99':>9} {'TTFT SLO':>8} {'TBT SLO':>8}"]
    for name, label in (("all", "all"), ("short", "short"), ("long", "long"), ("short_during_long_prefill", "short*")):
        c = summary.get(name)
        if not c or not c["num_requests"]:
            continue
        tbt = c["tbt_s"]
        lines.append(
            f"{label:<6} {c['num_requests']:>6} {_s(c['ttft_s']['p50']):>9} {_s(c['ttft_s']['p99']):>9} "
            f"{format_ms(tbt['p50']):>8} {format_ms(tbt['p99']):>8} {c['e2e_s']['p99']:>8.1f}s "
            f"{format_pct(c['ttft_attainment']):>8} {format_pct(c.get('tbt_attainment')):>8}")
    t = summary["throughput"]
    lines.append(f"{summary['num_steps']} steps, makespan {summary['makespan_s']:.1f}s (virtual), "
                 f"{t['output_tokens_per_s']:.0f} output tok/s, {t['prompt_tokens_per_s']:.0f} prompt tok/s, "
                 f"{summary['num_preemptions']} preemptions; simulated in {summary['sim_wall_s']:.1f}s")
    if summary.get("short_during_long_prefill", {}).get("num_requests"):
        lines.append("short* = short requests that waited for their first token while a long prompt was prefilled "
                     "(as `bench serve` reports them)")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    """Seconds, to the millisecond under 10 s (a short prompt's TTFT), else to the tenth."""
    if value is None:
        return "-"
    return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"
