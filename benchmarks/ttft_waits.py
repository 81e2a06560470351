"""Where a short request's first token went while a long prompt was prefilled: the wait from its
arrival to the start of its first step, and its own steps, from a `bench serve` result (`serve.json`)
and the server's `--step-log` of the same run.

The step log names requests by the server's ids and the bench by arrival, so requests are matched by
prompt length in order of arrival, and the two clocks by the median offset between a request's first
token at the client and the landing of its last prompt step.

    python benchmarks/ttft_waits.py out/serve-1gpu/serve.json out/steps.jsonl [--top 6]   (either may be gzipped)
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from mnemosyne.bench.serve import NUM_WARMUP
from mnemosyne.bench.serve_report import percentile

LONG_TOKENS = 32768
"""Prompts of at least this many tokens are the long ones (`bench serve --long-threshold`'s default)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("serve_json", type=Path)
    parser.add_argument("step_log", type=Path)
    parser.add_argument("--top", type=int, default=6, help="the slowest requests to list")
    args = parser.parse_args()

    steps = [json.loads(line) for line in _text(args.step_log).splitlines() if line.strip()]
    run = next(iter(json.loads(_text(args.serve_json))["runs"].values()))
    longs = {c[0] for s in steps for c in s["chunks"] if c[1] + c[2] >= LONG_TOKENS}
    chunks = defaultdict(list)  # request id -> indices of its prompt steps
    for i, step in enumerate(steps):
        for request_id, _, _ in step["chunks"]:
            if request_id not in longs:
                chunks[request_id].append(i)
    by_length = defaultdict(list)
    for request_id, indices in chunks.items():
        last = next(c for c in steps[indices[-1]]["chunks"] if c[0] == request_id)
        by_length[last[1] + last[2]].append(indices)
    for found in by_length.values():
        found.sort()

    timings = sorted(run["timings"], key=lambda t: t["arrival_s"])
    # the server saw the warm-up requests (the trace's first short prompts) and the solo ones first
    short = [t["num_prompt_tokens"] for t in timings if t["num_prompt_tokens"] < LONG_TOKENS]
    seen: dict[int, int] = Counter(short[:NUM_WARMUP] + [t["num_prompt_tokens"] for t in run["solo"]])
    pairs = []
    for t in timings:
        n = t["num_prompt_tokens"]
        if n < LONG_TOKENS and seen[n] < len(by_length[n]):
            pairs.append((t, by_length[n][seen[n]]))
        seen[n] += 1
    offset = statistics.median(t["token_s"][0] - steps[indices[-1]]["t_s"] for t, indices in pairs)
    windows = [(t["arrival_s"], t["token_s"][0]) for t in timings if t["num_prompt_tokens"] >= LONG_TOKENS]

    rows = []
    for t, indices in pairs:
        if not any(a <= t["arrival_s"] <= b for a, b in windows):
            continue
        first = steps[indices[0]]
        start_s = first["t_s"] - first["measured_ms"] / 1e3 + offset
        landed = [s for s in steps if t["arrival_s"] < s["t_s"] + offset < start_s + 5e-4]
        rows.append({"ttft_ms": 1e3 * (t["token_s"][0] - t["arrival_s"]), "wait_ms": 1e3 * (start_s - t["arrival_s"]),
                     "own_ms": 1e3 * (steps[indices[-1]]["t_s"] + offset - start_s), "tokens": t["num_prompt_tokens"],
                     "own_steps": len(indices), "waited_steps": len(landed),
                     "waited_long": sum(any(c[0] in longs for c in s["chunks"]) for s in landed)})
    print(f"{len(rows)} short requests arrived during a long prefill (clock offset {offset:.3f} s)")
    for key in ("ttft_ms", "wait_ms", "own_ms"):
        values = [r[key] for r in rows]
        print(f"{key:8} p50 {percentile(values, 50):6.1f}  p90 {percentile(values, 90):6.1f}  "
              f"p99 {percentile(values, 99):6.1f}  max {max(values):6.1f}")  # as bench serve takes them
    print("slowest: TTFT ms, wait ms, own steps' ms, prompt tokens, own steps, steps landed while it waited"
          " (a long prompt's among them)")
    for r in sorted(rows, key=lambda r: r["ttft_ms"])[-args.top:]:
        print(f"  {r['ttft_ms']:6.1f} {r['wait_ms']:6.1f} {r['own_ms']:6.1f} {r['tokens']:6d} {r['own_steps']:3d} "
              f"{r['waited_steps']:3d} ({r['waited_long']})")


def _text(path: Path) -> str:
    """A file's text, gzipped (as in benchmarks/results/) or not."""
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


if __name__ == "__main__":
    main()
