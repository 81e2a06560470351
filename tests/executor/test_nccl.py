"""The same multi-process path on GPUs: NCCL, one cuda:{local_rank} device per worker. Skipped
without two CUDA devices (CI has none; the lead runs these on a GPU machine)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch

from mnemosyne import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
PROMPTS = [[1, 2, 3, 4, 5], [7] * 23, list(range(40)), list(range(100, 161))]
ENGINE = dict(device="cuda", dtype="float32", kv_cache_memory=0.05, max_num_batched_tokens=16,
              attention_backend="reference")  # float32, for exact comparison; flash SDPA needs bf16


def _greedy(tp: int) -> list[list[int]]:
    llm = LLM("dummy:tiny", tensor_parallel_size=tp, **ENGINE)
    try:
        if tp > 1:
            assert llm.engine.executor.info.device == "cuda:0"
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.shutdown()


@pytest.mark.timeout(180)
def test_nccl_tp2_matches_single_gpu():
    assert _greedy(2) == _greedy(1)


@pytest.mark.timeout(180)
def test_nccl_kvp2_matches_single_gpu():
    # 64-token KVP groups: the two longest prompts (with their 32 new tokens) span both GPUs
    llm = LLM("dummy:tiny", kv_parallel_size=2, kvp_group_max_tokens=64, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == _greedy(1)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sequence_pipelining", [True, False])
def test_nccl_pp2_matches_single_gpu(tmp_path, sequence_pipelining):
    # dummy:tiny has 2 layers: one per stage. The trace makes every stage sync and report.
    llm = LLM("dummy:tiny", pipeline_parallel_size=2, sequence_pipelining=sequence_pipelining,
              trace_file=str(tmp_path / "trace.json"), **ENGINE)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == _greedy(1)
    assert (tmp_path / "trace.json").stat().st_size > 0


@pytest.mark.timeout(180)
def test_nccl_killed_worker_fails_fast():
    # NCCL peers do not notice a dead rank (they wait in the collective): the engine sees the death
    # through the process handle and terminates the survivor.
    llm = LLM("dummy:tiny", tensor_parallel_size=2, **ENGINE)
    pids = llm.engine.executor.worker_pids
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Timer(2.0, kill)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="worker rank 1 died unexpectedly"):
            llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=4000), use_tqdm=False)
    finally:
        killer.cancel()
    assert killed_at and time.monotonic() - killed_at[0] < 10


@pytest.mark.timeout(300)
def test_nccl_kvp2_decode_graphs_match_eager(capfd, caplog):
    """KVP decodes of multi-group requests replay CUDA graphs that hold the merge over the KVP group.
    bf16 on the GPU backend: the graphs' fixed decode splits and padded GEMMs round differently from
    the eager steps, so tokens must agree until a near-tie (top-2 margin under 0.05 nats) and
    logprobs within 0.05 up to there."""
    caplog.set_level(logging.INFO)  # the workers log at the engine's level: the capture is seen
    prompts = [list(range(3, 93)), [7] * 23, list(range(100, 170)), [1, 2, 3, 4, 5]]
    params = SamplingParams(max_tokens=48, logprobs=2, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM("dummy:tiny", device="cuda", dtype="bfloat16", kv_cache_memory=0.05, max_num_batched_tokens=16,
                  max_num_seqs=8, kv_parallel_size=2, kvp_group_max_tokens=64, enforce_eager=eager)
        try:
            runs[eager] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    assert "KVP gathers (2, 4, 8)" in capfd.readouterr().err
    compared = 0
    for want, got in zip(runs[True], runs[False], strict=True):
        for i, (w, g) in enumerate(zip(want.token_ids, got.token_ids, strict=True)):
            top = want.logprobs[i].top_logprobs
            if w != g:
                assert top[0] - top[1] < 0.05, f"token {i}: {w} vs {g} with margin {top[0] - top[1]:.3f}"
                break
            assert abs(want.logprobs[i].logprob - got.logprobs[i].logprob) < 0.05
            compared += 1
    assert compared >= 100  # most of the 4 × 48 tokens, most of them decoded over both groups
