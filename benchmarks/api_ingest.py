"""How long the API process's event loop is held by a long token-id prompt, from the body's bytes to the
message sent to the engine core: JSON validation, the prompt's checks, packing. Every stream the server
serves waits for this, so it shows up as short requests' TTFT and TBT when a long prompt arrives.

    python benchmarks/api_ingest.py [--lengths 131072,196608,1048576] [--repeats 5]

CPU only; prints the median of each stage per prompt length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from mnemosyne.engine.core_wire import pack_token_ids
from mnemosyne.server.protocol import CompletionRequest, parse_body
from mnemosyne.server.serving import check_token_ids

VOCAB_SIZE = 128256


def body(num_tokens: int) -> bytes:
    prompt = np.random.default_rng(num_tokens).integers(0, VOCAB_SIZE, num_tokens).tolist()
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 16, "stream": True}).encode()


def stages(raw: bytes) -> dict[str, float]:
    times = {}
    t0 = time.perf_counter()
    request = parse_body(CompletionRequest, raw)
    t1 = time.perf_counter()
    check_token_ids(request.prompt, VOCAB_SIZE)
    t2 = time.perf_counter()
    pack_token_ids(request.prompt)
    t3 = time.perf_counter()
    times["validate"], times["check"], times["pack"], times["total"] = t1 - t0, t2 - t1, t3 - t2, t3 - t0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,196608,1048576")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'prompt ids':>10} {'body MB':>8} {'validate':>9} {'check':>7} {'pack':>7} {'total':>8}  (ms, median)")
    for length in (int(x) for x in args.lengths.split(",")):
        raw = body(length)
        runs = [stages(raw) for _ in range(args.repeats)]
        med = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{length:>10} {len(raw) / 1e6:>8.2f} {med['validate']:>9.1f} {med['check']:>7.1f} "
              f"{med['pack']:>7.1f} {med['total']:>8.1f}")


if __name__ == "__main__":
    main()
