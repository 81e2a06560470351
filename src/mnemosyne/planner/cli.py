"""`mnemosyne plan` flags and entry point: the ranked layouts for one context on N GPUs, a sweep over
GPU counts, or `--validate` against measurements. Imported when the CLI builds its parser, so
nothing heavy is imported at module level."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_tokens(text: str, flag: str = "--context") -> int:
    """A token count: 262144, 256K, 1M, 1.5M or 10M (K = 1024, M = 1024²)."""
    text = text.strip().upper().replace("_", "")
    scale = _UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        value = float(number) * scale
    except ValueError:
        value = 0.0
    if not value >= 1 or value != int(value):
        raise ValueError(f"{flag} must be a positive token count such as 262144, 256K, 1M or 10M, got {text!r}")
    return int(value)


def parse_list(text: str, flag: str, kind=int) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} must be positive numbers separated by commas, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mnemosyne.config import EngineConfig

    p.add_argument("model", nargs="?", help="a dummy preset (llama-3-8b, dummy:llama-3-70b, ...) or an HF folder")
    what = p.add_argument_group("request and hardware")
    what.add_argument("--context", help="prompt tokens, e.g. 1M or 10M (K = 1024, M = 1024²)")
    what.add_argument("--gpus", type=int, help="GPU count to plan for")
    what.add_argument("--gpu", default="h100", help="GPU type: h100 (SXM) or h200 (default: h100)")
    what.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one NVLink domain (default: 8)")
    what.add_argument("--nvlink-gb-per-s", type=float, default=350.0,
                      help="achieved per-GPU NVLink bandwidth, GB/s (default: 350)")
    what.add_argument("--nvlink-latency-us", type=float, default=20.0, help="NVLink collective latency (default: 20)")
    what.add_argument("--ib-gb-per-s", type=float, default=45.0,
                      help="achieved per-GPU InfiniBand bandwidth between nodes, GB/s (default: 45)")
    what.add_argument("--ib-latency-us", type=float, default=30.0, help="InfiniBand collective latency (default: 30)")
    slo = p.add_argument_group("SLOs and chunking")
    slo.add_argument("--ttft-slo-s", type=float, help="TTFT SLO of the request, seconds")
    slo.add_argument("--tbt-slo-ms", type=float, help="TBT SLO: of its decode, and of decodes batched with its prefill")
    slo.add_argument("--step-budget-ms", help="step budgets to try, comma-separated (default: the TBT SLO, "
                                              "or none: chunks as large as the token cap)")
    slo.add_argument("--chunking", default="adaptive", help="adaptive, pipeline or fixed:N (default: adaptive)")
    slo.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                     help=f"token cap of a step (default: {EngineConfig.max_num_batched_tokens})")
    slo.add_argument("--no-sequence-pipelining", dest="sequence_pipelining", action="store_false",
                     help="predict ordinary pipeline parallelism")
    model = p.add_argument_group("step-time model")
    model.add_argument("--profile", help="step-time profile of this GPU and model (`mnemosyne profile`)")
    model.add_argument("--calibrate", help="fit the roofline's efficiencies to this profile (any model; same "
                                           "GPU architecture)")
    model.add_argument("--power-profile", help="JSON: idle_w, prefill_w, decode_w (default: nominal)")
    out = p.add_argument_group("output")
    out.add_argument("--rank-by", default="ttft", help="ttft, tbt or energy (default: ttft)")
    out.add_argument("--top", type=int, default=10, help="rows of the ranked table (default: 10)")
    out.add_argument("-o", "--output", help="write the predictions as JSON")
    out.add_argument("--sweep-gpus", help="GPU counts, e.g. 1,2,4,8,16,32,64,128: the best layout of each")
    out.add_argument("--plot", help="with --sweep-gpus: PNG of predicted TTFT against GPU count")
    out.add_argument("--validate", help="JSON list of measurements: print the prediction error of each")
    out.add_argument("--tolerance", type=float, default=0.10, help="--validate's bar (default: 0.10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.validate:
        return _validate(args)
    from mnemosyne.planner import report
    from mnemosyne.planner.search import Search, Slos, best_per_count

    if not args.model or not args.context:
        raise ValueError("mnemosyne plan needs MODEL and --context (or --validate FILE)")
    if args.gpus is None and not args.sweep_gpus:
        raise ValueError("mnemosyne plan needs --gpus N or --sweep-gpus LIST")
    model = load_model(args.model)
    gpu, profile, source = hardware(args, model)
    context = parse_tokens(args.context)
    slos = Slos(args.ttft_slo_s, None if args.tbt_slo_ms is None else args.tbt_slo_ms / 1e3)
    budgets = ([b / 1e3 for b in parse_list(args.step_budget_ms, "--step-budget-ms", float)]
               if args.step_budget_ms else [slos.tbt_s])
    search = Search(model, gpu, interconnect(args), context, slos, tuple(budgets), args.chunking,
                    args.max_num_batched_tokens, profile, args.sequence_pipelining)
    setup = {"model": args.model, "context": context, "gpu": gpu.key, "device": asdict(gpu.device),
             "power": asdict(gpu.power), "interconnect": asdict(search.net), "step_time_model": source,
             "ttft_slo_s": slos.ttft_s, "tbt_slo_s": slos.tbt_s, "chunking": args.chunking,
             "max_num_batched_tokens": args.max_num_batched_tokens, "note": report.PREDICTED}
    print(f"{args.model}, {report.format_tokens(context)} tokens, {gpu.device.name}: {source}; "
          f"{report.PREDICTED}")
    result: dict[str, Any] = {"setup": setup}
    if args.sweep_gpus:
        best = best_per_count(search, parse_list(args.sweep_gpus, "--sweep-gpus"), args.rank_by)
        print(report.format_sweep(best))
        result["sweep"] = [{"num_gpus": n, "best": None if v is None else report.to_row(v)} for n, v in best.items()]
        if args.plot:
            points = [(n, v.prediction.ttft_s) for n, v in best.items() if v is not None]
            report.plot_ttft_vs_gpus({f"{args.model}, {report.format_tokens(context)}": points}, args.plot,
                                     f"best layout per GPU count on {gpu.key}")
    if args.gpus is not None:
        verdicts = search.run(args.gpus, args.rank_by)
        print(report.format_ranked(verdicts, args.top))
        result["ranked"] = [report.to_row(v) for v in verdicts]
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def load_model(name: str):
    """A model config without weights: a bare dummy preset name is read as dummy:<preset>."""
    from mnemosyne.models.loaders import resolve_model
    from mnemosyne.models.loaders.dummy import PRESETS

    return resolve_model(f"dummy:{name}" if name in PRESETS else name).load_config()


def interconnect(args: argparse.Namespace):
    from mnemosyne.planner.interconnect import Interconnect

    return Interconnect(args.gpus_per_node, args.nvlink_gb_per_s * 1e9, args.nvlink_latency_us * 1e-6,
                        args.ib_gb_per_s * 1e9, args.ib_latency_us * 1e-6)


def hardware(args: argparse.Namespace, model, gpu_name: str | None = None):
    """(Gpu, profile or None, a line naming the step-time model) from --gpu, --profile, --calibrate and
    --power-profile."""
    from mnemosyne.planner.hardware import PowerProfile, calibrate, gpu_named
    from mnemosyne.scheduler.latency_model import Profile

    gpu = gpu_named(gpu_name or args.gpu)
    if args.power_profile:
        gpu = replace(gpu, power=PowerProfile.load(args.power_profile))
    if args.profile and args.calibrate:
        raise ValueError("--profile and --calibrate are alternatives: give one")
    if args.profile:
        profile = Profile.load(args.profile)
        _check_profile(profile, model, gpu.key, "--profile")
        return gpu, profile, f"profile {args.profile} ({profile.device_name})"
    if args.calibrate:
        profile = Profile.load(args.calibrate)
        measured_on = gpu_named("h200" if "H200" in profile.device_name else "h100")
        cal = calibrate(profile, load_model(profile.model), measured_on.device, args.calibrate)
        gpu = replace(gpu, device=cal.apply(gpu.device))
        return gpu, None, (f"roofline calibrated on {args.calibrate} ({profile.device_name}): FLOP efficiency "
                           f"{cal.flops_efficiency:.2f}, bandwidth {cal.bandwidth_efficiency:.2f}, step overhead "
                           f"{cal.step_overhead_s * 1e3:.2f} ms")
    d = gpu.device
    return gpu, None, (f"nominal roofline: FLOP efficiency {d.flops_efficiency:.2f}, bandwidth "
                       f"{d.bandwidth_efficiency:.2f}, step overhead {d.step_overhead_s * 1e3:.2f} ms")


def _check_profile(profile, model, gpu_key: str, flag: str) -> None:
    """A profile's tables hold for the GPU and model shape it was measured with only."""
    if gpu_key.upper() not in profile.device_name.upper():
        raise ValueError(f"{flag} was measured on {profile.device_name}, not {gpu_key}: "
                         "use --calibrate to carry its efficiencies over")
    try:
        measured = load_model(profile.model)
    except ValueError:
        logger.warning("%s: cannot read the profiled model %r; assuming it has this model's shape",
                       flag, profile.model)
        return
    shape = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
    if any(getattr(measured, f) != getattr(model, f) for f in shape):
        raise ValueError(f"{flag} was measured on {profile.model}, another shape: use --calibrate instead")


def _validate(args: argparse.Namespace) -> int:
    from mnemosyne.planner import validate

    net = interconnect(args)
    comparisons = []
    for m in validate.load_measurements(args.validate):
        name = m.model or args.model
        if not name:
            raise ValueError("a measurement names no model: give MODEL or a \"model\" field")
        model = load_model(name)
        gpu, profile, _ = hardware(args, model, m.device)
        row_net = net if m.gpus_per_node == net.gpus_per_node else replace(net, gpus_per_node=m.gpus_per_node)
        comparisons += validate.compare(m, model, gpu, row_net, profile)
    print(validate.format_table(comparisons, args.tolerance))
    if args.output:
        Path(args.output).write_text(json.dumps(validate.to_json(comparisons, args.tolerance), indent=1) + "\n")
    return 0 if all(c.within(args.tolerance) for c in comparisons) else 1
