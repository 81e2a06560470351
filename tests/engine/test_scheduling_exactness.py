"""Outputs must not depend on how the scheduler slices the work: chunk budgets, staggered
arrivals and preemption all give the tokens of a solo, unchunked run."""

from __future__ import annotations

import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.request import SamplingParams
from tests.engine.staggered import run_staggered
from tests.reference import hf_greedy, save_tiny

NUM_NEW = 32
# 8 prompts of different lengths; token ids so no tokenizer is involved
PROMPTS = [[(7 * i + 3 * j) % 380 + 3 for j in range(n)] for i, n in enumerate((5, 40, 1, 77, 16, 17, 63, 9))]
KV_BYTES_PER_TOKEN = 3 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head_dim × fp32


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = save_tiny(path, "llama-gqa-untied")
    return path, hf


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    _, hf = tiny_checkpoint
    return [hf_greedy(hf, p, NUM_NEW) for p in PROMPTS]


def run(engine: LLMEngine, arrival_steps: list[int]) -> list[list[int]]:
    """Add prompt i at step arrival_steps[i]; run to completion; tokens in prompt order."""
    outputs = run_staggered(engine, PROMPTS, arrival_steps, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outputs]


def make_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                  **{"kv_cache_memory": 0.01, **overrides}))


@pytest.mark.parametrize("budget", [1, 7, 64, 1 << 20])
def test_chunk_budgets_and_staggered_arrivals(tiny_checkpoint, expected, budget):
    path, _ = tiny_checkpoint
    engine = make_engine(path, max_num_batched_tokens=budget)
    arrivals = [0, 0, 1, 3, 4, 10, 11, 40]
    assert run(engine, arrivals) == expected


def test_preemption_under_a_tiny_cache(tiny_checkpoint, expected):
    path, _ = tiny_checkpoint
    num_blocks = 12  # the longest request needs 7 blocks of 16; all eight together need ~50
    engine = make_engine(path, max_num_batched_tokens=48, kv_cache_memory=num_blocks * 16 * KV_BYTES_PER_TOKEN / 2**30)
    assert engine.scheduler.pool.num_blocks == num_blocks
    assert run(engine, [0] * len(PROMPTS)) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.pool.num_free_blocks == num_blocks  # everything given back


def test_request_larger_than_the_cache_is_rejected_at_once(tiny_checkpoint):
    path, _ = tiny_checkpoint
    engine = make_engine(path, kv_cache_memory=4 * 16 * KV_BYTES_PER_TOKEN / 2**30)
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(list(range(3, 3 + 65)), SamplingParams())
    assert not engine.has_unfinished_requests()
    engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=4))
    outs = [o for _ in range(10) for o in engine.step()]
    assert outs[-1].finished
