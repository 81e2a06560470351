"""What a layer graph's first replay costs: one worker's layer graphs (dummy:llama-3-8b, one GPU), each
bucket's pieces replayed (padding rows only, writing the scratch page) and timed to the device's end,
a first time and a second. Asked when kvp=4 serving with layer graphs stalled 150-300 ms mid-prefill
(call91-92); call93 found first and second replays alike, so that is not the cause.

    python benchmarks/layer_graph_replay.py [--buckets 32,256,1152]
"""

from __future__ import annotations

import argparse
import time

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.executor.worker import Worker
from mnemosyne.models.loaders import resolve_model
from mnemosyne.runner.layer_graphs import LayerGraphs


def timed(pieces) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for replay in pieces:
        replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--buckets", default="32,256,640,1152,2048")
    args = parser.parse_args()
    config = EngineConfig(model=args.model, device="cuda", max_model_len=32768, layer_graph_tokens=0)
    loader = resolve_model(config.model)
    worker = Worker(config, loader.load_config(), loader)
    runner = worker.runner
    graphs = LayerGraphs(runner.model, runner.kv_caches, config.max_num_batched_tokens, runner.scratch_slot,
                         worker.device)
    for b in (int(x) for x in args.buckets.split(",")):
        pieces = graphs._pieces[b]
        first, second = timed(pieces), timed(pieces)
        print(f"bucket {b:5d}: {len(pieces)} graphs, first replay {first:7.1f} ms, second {second:6.1f} ms")


if __name__ == "__main__":
    main()
