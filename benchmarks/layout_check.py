"""Exactness and decode speed of one parallel layout on GPUs: the first greedy tokens of a seeded
prompt (with the top-2 logprobs at each step, to tell a real divergence from a bf16 near-tie) and
the median decode TBT at batch 1. Each layout is one invocation writing one JSON; --compare reads
several and judges them against the first.

    python benchmarks/layout_check.py --tp 1 -o out/tp1.json
    python benchmarks/layout_check.py --tp 2 -o out/tp2.json
    python benchmarks/layout_check.py --compare out/tp1.json out/tp2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MNEMOSYNE_QUIET", "1")

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


def seeded_prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    """n token ids, pseudo-random but identical on every run and layout."""
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drain(engine: LLMEngine, request_id: str):
    """Step until request_id finishes; its final output."""
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                return out


def greedy_tokens(engine: LLMEngine, prompt: list[int], num_tokens: int) -> dict[str, Any]:
    """The first num_tokens greedy tokens, the top-2 logprobs of each step, and the TTFT."""
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=num_tokens, ignore_eos=True, logprobs=2))
    out = drain(engine, request_id)
    steps = out.outputs[0].logprobs or []
    return {"tokens": list(out.outputs[0].token_ids),
            "top2": [[list(s.top_token_ids[:2]), list(s.top_logprobs[:2])] for s in steps],
            "ttft_s": out.metrics.ttft_s}


def decode_tbt(engine: LLMEngine, prompt: list[int], steps: int) -> dict[str, float]:
    """Median and spread of the gaps between steps+1 tokens of one request."""
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    gaps = drain(engine, request_id).metrics.inter_token_s[1:]  # the first gap includes warm-up
    return {"tbt_ms": statistics.median(gaps) * 1e3, "tbt_p10_ms": sorted(gaps)[len(gaps) // 10] * 1e3,
            "tbt_p90_ms": sorted(gaps)[len(gaps) * 9 // 10] * 1e3}


def start_engine(**fields: Any) -> tuple[LLMEngine, dict[str, Any]]:
    """An engine with CUDA graphs; if it cannot start with them, eagerly, saying why."""
    try:
        engine = LLMEngine(EngineConfig(**fields))
        return engine, {"cuda_graphs": fields.get("device") != "cpu" and not fields.get("enforce_eager", False)}
    except Exception as e:  # recorded in the report, then retried eagerly
        if fields.get("enforce_eager"):
            raise
        print(f"engine failed to start with CUDA graphs ({type(e).__name__}: {e}); retrying eagerly", flush=True)
        release_gpu()
        return LLMEngine(EngineConfig(**{**fields, "enforce_eager": True})), {"cuda_graphs": False, "graph_error": repr(e)}


def release_gpu() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    contexts = [int(c) for c in str(args.decode_context).split(",")]
    started = time.perf_counter()
    engine, how = start_engine(
        model=args.model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
        kv_parallel_size=args.kvp, kvp_group_max_tokens=args.kvp_group_max_tokens, device=args.device,
        dtype=args.dtype, max_model_len=max(args.prompt_len + args.tokens, max(contexts) + args.decode_steps) + 64,
        max_num_seqs=4, max_num_batched_tokens=args.chunk, enforce_eager=args.enforce_eager)
    startup_s = time.perf_counter() - started
    try:
        vocab = engine.model_config.vocab_size
        result = {"model": args.model, "tp": args.tp, "pp": args.pp, "kvp": args.kvp, "prompt_len": args.prompt_len,
                  "dtype": args.dtype, "startup_s": startup_s, **how,
                  **greedy_tokens(engine, seeded_prompt(vocab, args.prompt_len), args.tokens)}
        if args.decode_steps:
            result["decode"] = {c: decode_tbt(engine, seeded_prompt(vocab, c, seed=1), args.decode_steps)
                                for c in contexts}
            result.update(result["decode"][contexts[0]], decode_context=contexts[0])
    finally:
        engine.shutdown()
    import torch

    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return result


def first_difference(reference: list[int], tokens: list[int]) -> int | None:
    """Index of the first token where the two runs differ, over their common length; None if none."""
    return next((i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b), None)


TIE_TOLERANCE = 0.05
"""Logprob margin under which two tokens are a near-tie that bf16 rounding may order either way: half
the 0.1 logit tolerance that tests/runner/test_gpu_numerics.py holds bf16 logits to against float32.
A layout that cuts a prompt into other chunks than the reference rounds differently; greedy decoding
then flips such a tie, and every token after it differs."""


def match_with_ties(reference: dict[str, Any], generate, tolerance: float = TIE_TOLERANCE) -> dict[str, Any]:
    """A layout's greedy tokens against a reference run's (`greedy_tokens` results: tokens and top2),
    allowing near-ties. `generate(forced, n)` is the layout's `greedy_tokens` of the prompt followed by
    the tokens `forced`, for n tokens. Where the two first differ, it is a near-tie if both runs rank
    the same two tokens first, each with a margin within `tolerance`; the comparison then goes on from
    the reference's token, as if the layout had picked it. Returns the layout's own tokens, the strict
    equal prefix, how many of the reference's tokens matched up to the first difference that is not a
    near-tie (`matched`), and the near-ties on the way."""
    want, want_top2, n = reference["tokens"], reference["top2"], len(reference["tokens"])
    first = generate([], n)
    tokens, top2 = list(first["tokens"]), list(first["top2"])
    strict = first_difference(want, tokens)
    ties, start = [], 0
    while (diff := first_difference(want[start:], tokens[start:])) is not None:
        j = start + diff
        (ref_ids, ref_lps), (ids, lps) = want_top2[j], top2[j]
        ref_margin, margin = ref_lps[0] - ref_lps[1], lps[0] - lps[1]
        if set(ref_ids) != set(ids) or ref_margin > tolerance or margin > tolerance:
            return {"tokens": first["tokens"], "equal_prefix": n if strict is None else strict, "matched": j,
                    "ties": ties, "compared": n}
        ties.append({"index": j, "reference": want[j], "layout": tokens[j], "reference_margin": ref_margin,
                     "margin": margin})
        rest = generate(want[:j + 1], n - j - 1) if j + 1 < n else {"tokens": [], "top2": []}
        tokens, top2 = [*tokens[:j], want[j], *rest["tokens"]], [*top2[:j + 1], *rest["top2"]]
        start = j + 1
    return {"tokens": first["tokens"], "equal_prefix": n if strict is None else strict,
            "matched": min(n, len(tokens)), "ties": ties, "compared": n}


def describe_match(match: dict[str, Any]) -> str:
    """'5/16 greedy tokens equal; 16/16 with 1 near-tie (token 5: margins 0.0077 and 0.0101)'."""
    text = f"{match['equal_prefix']}/{match['compared']} greedy tokens equal"
    if match["ties"]:
        where = ", ".join(f"token {t['index']}: margins {t['reference_margin']:.4f} and {t['margin']:.4f}"
                          for t in match["ties"])
        text += (f"; {match['matched']}/{match['compared']} with {len(match['ties'])} near-tie"
                 f"{'s' if len(match['ties']) > 1 else ''} within {TIE_TOLERANCE} ({where})")
    return text


def compare(paths: list[Path]) -> str:
    """A table of each layout against the first: tokens equal, first divergence and its margin, TBT."""
    runs = [json.loads(p.read_text()) for p in paths]
    base = runs[0]
    lines = [f"reference: {_layout(base)}, {base['model']}, {base['prompt_len']}-token prompt, {base['dtype']}",
             f"{'layout':<18} {'tokens':>7} {'first diff':>10} {'ref margin':>10} {'TBT ms at context':>24} graphs"]
    for r in runs:
        n = min(len(r["tokens"]), len(base["tokens"]))
        diff = first_difference(base["tokens"], r["tokens"])
        margin = "" if diff is None else f"{base['top2'][diff][1][0] - base['top2'][diff][1][1]:.4f}"
        same = f"{n if diff is None else diff}/{n}"
        tbts = " ".join(f"{d['tbt_ms']:.2f}@{c}" for c, d in r.get("decode", {}).items())
        lines.append(f"{_layout(r):<18} {same:>7} {'-' if diff is None else diff:>10} {margin:>10} {tbts:>24} "
                     f"{r.get('cuda_graphs')}")
    return "\n".join(lines)


def _layout(r: dict) -> str:
    return f"tp={r['tp']} pp={r['pp']} kvp={r['kvp']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--kvp", type=int, default=1)
    p.add_argument("--kvp-group-max-tokens", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared across layouts")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps timed at batch 1 (0: none)")
    p.add_argument("--decode-context", default="4096", help="contexts of the timed decodes, comma-separated")
    p.add_argument("--chunk", type=int, default=8192, help="--max-num-batched-tokens")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("-o", "--output", type=Path)
    p.add_argument("--compare", nargs="+", type=Path, help="judge these JSONs against the first")
    args = p.parse_args()
    if args.compare:
        print(compare(args.compare))
        return
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "top2"}))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
