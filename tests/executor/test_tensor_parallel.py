"""Tensor parallelism over worker processes (gloo on CPU) gives the single-process run's greedy
tokens exactly, and the same logprobs to float32 tolerance, on mixed batches with chunked prefill."""

from __future__ import annotations

import pytest
import torch

from mnemosyne import LLM, SamplingParams
from tests.executor.parallel_checks import assert_same_outputs

# Token-id prompts of several lengths: with a 16-token budget the long ones are prefilled in chunks
# while the short ones already decode, so steps mix decodes and prefill chunks.
PROMPTS = [[1, 2, 3, 4, 5], [7] * 23, list(range(40)), [300, 2], list(range(100, 161))]
GREEDY = SamplingParams(max_tokens=32, logprobs=3)
SAMPLED = SamplingParams(max_tokens=32, temperature=0.8, seed=7)
"""Seeded sampling: every tp rank samples with the same generator from the same gathered logits."""
ENGINE = dict(kv_cache_memory=0.01, max_num_batched_tokens=16, seed=0, device="cpu")


def _generate(model: str, tp: int) -> list:
    llm = LLM(model, tensor_parallel_size=tp, **ENGINE)
    try:
        params = [GREEDY] * (len(PROMPTS) - 1) + [SAMPLED]
        return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def tiny_reference() -> list:
    return _generate("dummy:tiny", tp=1)


@pytest.fixture(scope="module")
def kv1_model(tmp_path_factory) -> str:
    """An HF folder (through the HF loader) with a single kv head, so every tp rank replicates it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama-kv1")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process(tiny_reference, tp):
    # dummy:tiny has 2 kv heads: at tp=4 each is replicated on two ranks.
    assert_same_outputs(tiny_reference, _generate("dummy:tiny", tp), 32)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tp4_with_one_kv_head_matches_single_process(kv1_model):
    assert_same_outputs(_generate(kv1_model, tp=1), _generate(kv1_model, tp=4), 32)


@pytest.mark.timeout(30)
def test_unshardable_layout_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="tensor-parallel-size 3 does not divide the model's attention heads"):
        LLM("dummy:tiny", tensor_parallel_size=3, **ENGINE)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_each_tp_rank_holds_only_its_shard():
    def infos(tp: int) -> dict:
        llm = LLM("dummy:tiny", tensor_parallel_size=tp, **ENGINE)
        try:
            return llm.engine.executor.worker_infos
        finally:
            llm.engine.shutdown()

    [whole] = infos(1).values()
    shards = infos(2)
    assert sorted(shards) == [0, 1]
    for info in shards.values():  # only the norms are replicated
        assert 0.45 * whole.weight_bytes < info.weight_bytes < 0.55 * whole.weight_bytes
        assert info.kv_cache_bytes > 0
