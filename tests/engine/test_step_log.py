"""--step-log: one JSON line per landed step, with what it held, its predicted and measured time, and
the step budget's correction."""

from __future__ import annotations

import itertools
import json

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams


def test_every_step_is_logged_with_its_chunks_and_times(tmp_path):
    path = tmp_path / "steps.jsonl"
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_memory=0.01,
                                    max_num_batched_tokens=32, tbt_slo_ms=1000, step_log=str(path)))
    engine.add_request(list(range(3, 73)), SamplingParams(max_tokens=4, ignore_eos=True), request_id="long")
    engine.add_request(list(range(3, 8)), SamplingParams(max_tokens=4, ignore_eos=True), request_id="short")
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    engine.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert 0 < len(lines) <= num_steps
    assert [line["step"] for line in lines] == sorted(line["step"] for line in lines)
    prefill = [line for line in lines if line["chunks"]]
    # the 70-token prompt's chunks cover it exactly, in order
    starts = [(start, n) for line in prefill for rid, start, n in line["chunks"] if rid == "long"]
    assert starts[0][0] == 0 and sum(n for _, n in starts) == 70
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(starts))
    # every step carries the model's prediction and, on one stage, its measured time (steps planned
    # ahead too: the time since the step before landed)
    assert all(line["predicted_ms"] > 0 and line["measured_ms"] > 0 for line in lines)
    assert all(line["factor"] is not None for line in lines)
    # the host time of planning and launching each step, and whether it was queued behind another
    assert all(line["launch_ms"] > 0 and isinstance(line["queued"], bool) for line in lines)
    decode_only = [line for line in lines if not line["chunks"]]
    assert decode_only and all(line["decodes"] >= 1 for line in decode_only)
    assert all(a["t_s"] <= b["t_s"] for a, b in itertools.pairwise(lines))
