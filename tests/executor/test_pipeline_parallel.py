"""Pipeline parallelism over worker processes (gloo on CPU) gives the single-process run's tokens
exactly: pp=2 and pp=3, each with and without tp=2, with sequence pipelining on and off, on mixed
batches of chunked prompts and decodes with several micro-batches in flight. A trace written by
the pp=2 run shows stage 0 working on a prompt's next chunk while stage 1 works on the previous one."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from mnemosyne import LLM, SamplingParams
from mnemosyne.executor.multiproc import WorkerFailedError
from tests.executor.parallel_checks import assert_same_outputs
from tests.executor.test_faults import _wait_gone

MODEL = "dummy:tiny-6l"
# With a 16-token budget the long prompts are prefilled in up to 4 chunks while the short ones
# already decode, so micro-batches mix decodes and chunks.
PROMPTS = [[1, 2, 3, 4, 5], [7] * 23, list(range(40)), [300, 2], list(range(100, 161))]
NUM_NEW = 32
GREEDY = SamplingParams(max_tokens=NUM_NEW, logprobs=3, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=NUM_NEW, temperature=0.8, seed=7, ignore_eos=True)
PARAMS = [GREEDY] * (len(PROMPTS) - 1) + [SAMPLED]
ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=16, chunking="fixed:16", scheduler="fcfs",
              seed=0, device="cpu")
TINY_KV_GIB = 14 * 16 * 512 / 2**30
"""14 blocks of 16 tokens at 2 layers per stage (fp32, 2 kv heads × 16): fewer than the run needs,
so requests are preempted, some while their chunks are still in the pipeline."""


def _generate(**engine) -> list:
    llm = LLM(MODEL, **{**ENGINE, **engine})
    try:
        return [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def reference() -> list:
    return _generate()


@pytest.fixture(scope="module")
def pp2_trace(tmp_path_factory, reference) -> dict:
    path = tmp_path_factory.mktemp("trace") / "spp.json"
    assert_same_outputs(reference, _generate(pipeline_parallel_size=2, trace_file=str(path)), NUM_NEW)
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_pp2_matches_single_process(pp2_trace):
    assert pp2_trace["traceEvents"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_pp3_uneven_split_with_preemption_in_flight_matches_single_process(reference):
    out = _generate(pipeline_parallel_size=3, pp_layer_split="1,4,1", kv_cache_memory=TINY_KV_GIB)
    # a preempted request's generator restarts from its seed: compare only the unseeded ones
    assert_same_outputs(reference, out, NUM_NEW, [p.seed is None for p in PARAMS])


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_pp2_tp2_scatter_gather_matches_single_process(reference):
    out = _generate(pipeline_parallel_size=2, tensor_parallel_size=2, pp_scatter_gather=True)
    assert_same_outputs(reference, out, NUM_NEW)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pp3_tp2_without_sequence_pipelining_matches_single_process(reference):
    out = _generate(pipeline_parallel_size=3, tensor_parallel_size=2, sequence_pipelining=False)
    assert_same_outputs(reference, out, NUM_NEW)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_trace_shows_a_prompts_chunks_in_two_stages_at_once(pp2_trace):
    slices = [e for e in pp2_trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in pp2_trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"stage 0", "stage 1"}
    assert {e["args"]["step_id"] for e in slices if e["tid"] == 0} == {e["args"]["step_id"] for e in slices if e["tid"] == 1}

    def chunks(event: dict) -> dict[str, tuple[int, int]]:
        """request id -> [start, end) of its chunk in the slice's micro-batch."""
        args = event["args"]
        return {rid: (start, start + n) for rid, start, n
                in zip(args["request_ids"], args["starts"], args["num_new_tokens"], strict=True)}

    def overlap(a: dict, b: dict) -> bool:
        return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]

    # SPP: stage 0 runs chunk i+1 of a prompt while stage 1 still runs chunk i of the same prompt.
    pipelined = [(s0["name"], s1["name"]) for s0 in slices if s0["tid"] == 0 for s1 in slices
                 if s1["tid"] == 1 and overlap(s0, s1) and any(
                     rid in chunks(s1) and chunks(s1)[rid][1] == span[0] for rid, span in chunks(s0).items())]
    assert pipelined, "no prompt ever had chunks in both stages at once"


@pytest.mark.timeout(30)
def test_layer_split_that_does_not_cover_the_model_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="pp-layer-split 1,1,1 covers 3 layers; the model has 6"):
        LLM(MODEL, pipeline_parallel_size=3, pp_layer_split="1,1,1", **ENGINE)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_stage0_worker_ends_generate_with_a_clear_error_within_10s():
    llm = LLM(MODEL, pipeline_parallel_size=2, **ENGINE)
    pids = llm.engine.executor.worker_pids
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Timer(1.5, kill)
    killer.start()
    try:
        with pytest.raises(WorkerFailedError, match=r"worker rank 0 died unexpectedly") as info:
            llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=3000, ignore_eos=True), use_tqdm=False)
    finally:
        killer.cancel()
    assert killed_at and time.monotonic() - killed_at[0] < 10
    assert info.value.rank == 0
    assert _wait_gone(list(pids.values()), timeout_s=10), "the other stage was not shut down"
