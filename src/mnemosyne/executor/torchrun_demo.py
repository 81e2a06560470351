"""Greedy generation from token-id prompts, for checking a torchrun launch end to end (no tokenizer
needed). Run the same command on every node; global rank 0 prints one JSON line of output ids:

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0,1} --master-addr HOST --master-port PORT \\
        -m mnemosyne.executor.torchrun_demo dummy:tiny -tp 4 --prompt-token-ids 1,2,3 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mnemosyne.cli import add_engine_args, engine_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnemosyne.executor.torchrun_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument("--prompt-token-ids", action="append", required=True,
                        help="comma-separated token ids of one prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    args = parser.parse_args(argv)
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.request import SamplingParams

    engine = LLMEngine(engine_config(args))  # on ranks other than 0 this serves as a worker, then exits
    print("torchrun_demo: engine ready", file=sys.stderr, flush=True)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    ids = [engine.add_request([int(t) for t in p.split(",")], params) for p in args.prompt_token_ids]
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    engine.shutdown()
    print(json.dumps({"token_ids": [outputs[i] for i in ids]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
