"""The Llama-family model against HF transformers with the same weights: logits at every prompt
position within float32 rounding, and identical greedy tokens for 32+ steps."""

from __future__ import annotations

import pytest
import torch
import transformers

from mnemosyne import LLM, SamplingParams
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.models.loaders import resolve_model
from tests.reference import CONFIGS, hf_greedy, prefill_logits, save_tiny

# float32 on CPU: the two implementations order a few reductions differently, nothing more.
LOGIT_ATOL = 1e-4
NUM_NEW_TOKENS = 32


PROMPTS = [[5, 17, 33, 250, 7, 99, 100, 3], list(range(10, 75)), [42]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_configs_match_hf(tmp_path, name):
    hf = save_tiny(tmp_path, name)
    loader = resolve_model(str(tmp_path))
    ours = LlamaForCausalLM(loader.load_config())
    ours.load_weights(loader.iter_weights(torch.device("cpu"), torch.float32))
    for prompt in PROMPTS:
        with torch.inference_mode():
            expected = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(prefill_logits(ours, prompt), expected, atol=LOGIT_ATOL, rtol=0)

    llm = LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory=0.01)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, NUM_NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def smollm_pair(default_gguf):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32).eval()
    llm = LLM("smollm2-135m", device="cpu", dtype="float32")
    return hf, llm


@pytest.mark.slow
def test_default_gguf_matches_hf_gguf(smollm_pair):
    hf, llm = smollm_pair
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    model = llm.engine.executor.worker.model
    for ids in prompt_ids:
        with torch.inference_mode():
            expected = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(prefill_logits(model, ids), expected, atol=5e-4, rtol=0)
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, NUM_NEW_TOKENS)
    assert "Paris" in outs[0].outputs[0].text
