"""The `mnemosyne` command: serve | generate | bench | profile | simulate | plan.

Engine flags are generated from `EngineConfig`'s fields and their docstrings, so the help text
and the config can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from mnemosyne.config import EngineConfig, field_docs

_SHORT_FLAGS = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp", "kv_parallel_size": "-kvp"}
_PROGRESS_MIN_PROMPT_TOKENS = 2048


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add [MODEL] and one --flag per EngineConfig field (except model, the positional)."""
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(EngineConfig).items()}  # argparse formats help with %
    hints = typing.get_type_hints(EngineConfig)
    parser.add_argument("model", nargs="?", default=EngineConfig.model, help=docs["model"])
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([_SHORT_FLAGS[f.name]] if f.name in _SHORT_FLAGS else [])
        kind = _scalar_type(hints[f.name])
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=docs.get(f.name, ""))
            continue
        parser.add_argument(*flags, dest=f.name, type=kind, default=f.default,
                            help=f"{docs.get(f.name, '')} (default: {f.default})")


def _scalar_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """An EngineConfig from parsed flags; raises ValueError naming a bad flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**values, **overrides})


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.request import SamplingParams

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    elif args.prompt is not None:
        text = args.prompt
    else:
        text = sys.stdin.read()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed_sampling, stop=args.stop or None)
    engine = LLMEngine(engine_config(args))
    tokenizer = engine.tokenizer
    if not args.raw and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    request_id = engine.add_request(text, params)
    num_prompt = engine.scheduler.requests[request_id].num_prompt_tokens
    bar = tqdm(total=num_prompt, desc="prefill", unit="tok", file=sys.stderr,
               disable=num_prompt < _PROGRESS_MIN_PROMPT_TOKENS)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        request = engine.scheduler.requests.get(request_id)
        if request is not None and bar.n < num_prompt:
            bar.update(min(request.num_computed_tokens, num_prompt) - bar.n)
        for out in outputs:
            if bar.total and not bar.disable and bar.n < num_prompt:
                bar.update(num_prompt - bar.n)
            bar.close()
            sys.stdout.write(out.outputs[0].new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    engine.shutdown()
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion of one prompt to the terminal")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read standard input)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1)")
    p.add_argument("--top-k", type=int, default=-1, help="-1 disables (default: -1)")
    p.add_argument("--seed-sampling", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    p.set_defaults(func=_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from mnemosyne.server import launch

    p = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(p)
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)


def _bench_latency(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnemosyne.bench import latency

    prefill_lens = [int(x) for x in args.prefill_lens.split(",") if x]
    decode_shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.decode.split(",") if shape]
    longest = max(prefill_lens + [c for c, _ in decode_shapes]) + args.decode_steps + 8
    config = engine_config(args, max_model_len=args.max_model_len or longest,
                           max_num_seqs=max([args.max_num_seqs] + [b for _, b in decode_shapes]))
    print(latency.run(config, prefill_lens, decode_shapes, args.decode_steps, args.compare == "hf",
                      Path(args.output) if args.output else None))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against measured floors and peers (GPU)")
    kinds = p.add_subparsers(dest="bench", required=True)
    lat = kinds.add_parser("latency", help="TTFT of one prompt and TBT at a context, against floors and HF")
    add_engine_args(lat)
    lat.set_defaults(func=_bench_latency, model="dummy:llama-3-8b", max_num_batched_tokens=32768)
    lat.add_argument("--prefill-lens", default="8192,32768,131072", help="prompt lengths to time (comma-separated)")
    lat.add_argument("--decode", default="8192x1,32768x1,131072x1,4096x64",
                     help="decode shapes CONTEXTxBATCH (comma-separated)")
    lat.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per shape (median reported)")
    lat.add_argument("--compare", choices=["hf", "none"], default="hf", help="peer measured in the same run")
    lat.add_argument("-o", "--output", default=None, help="folder for latency.json, latency.txt and latency.png")
    from mnemosyne.bench import serve

    serve.add_arguments(kinds.add_parser("serve", help="replay a request trace against a server over streaming HTTP"))


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnemosyne.bench import profile

    return profile.run(engine_config(args), Path(args.output) if args.output else None, args.quick, args.check,
                       args.max_prefix)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure the step-time model's tables on this device")
    add_engine_args(p)
    p.add_argument("-o", "--output", default=None, help="write the profile here (JSON)")
    p.add_argument("--check", action="store_true",
                   help="report the prediction error on held-out batches (of -o, or of --latency-profile)")
    p.add_argument("--quick", action="store_true", help="a small grid, for a CPU and a tiny model")
    p.add_argument("--max-prefix", type=int, default=None, help="longest KV prefix measured (default: 131072)")
    p.set_defaults(func=_profile)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from mnemosyne.sim import cli as sim_cli

    p = sub.add_parser("simulate", help="run the scheduler on a virtual clock over a request trace")
    add_engine_args(p)
    sim_cli.add_arguments(p)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from mnemosyne.planner import cli as plan_cli

    p = sub.add_parser("plan", help="rank parallel layouts for a long context: predicted TTFT, TBT, memory, J/token")
    plan_cli.add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnemosyne", description="Exact long-context LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_simulate(sub)
    _add_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"mnemosyne: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
