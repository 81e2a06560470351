"""Reference implementations for tests: tiny HF checkpoints, HF greedy decoding by full
recomputation, and our model's logits at every prompt position."""

from __future__ import annotations

import torch
import transformers

from mnemosyne.attention.backend import build_metadata, select_backend
from mnemosyne.models.llama import LlamaForCausalLM

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama-gqa-untied": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=False)),
    "llama-mha-tied": (transformers.LlamaConfig, dict(TINY, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128})),
    "yarn-rope-scaling": (transformers.LlamaConfig, dict(TINY, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})),
    "qwen2-bias": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=False, use_sliding_window=False)),
    "mistral": (transformers.MistralConfig, dict(TINY, sliding_window=None, tie_word_embeddings=False)),
}


def save_tiny(path, name: str, seed: int = 0):
    config_cls, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs), dtype=torch.float32)
    model.save_pretrained(path)
    return model.eval()


def prefill_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """Logits [L, vocab] at every position of one prompt, through our model in one chunk."""
    cfg = model.config
    n = len(token_ids)
    kv = [torch.zeros(2, n, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    meta = build_metadata([(n, n, [0])], page_size=n)
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(n), kv, meta, select_backend("reference", "cpu"))
        return model.compute_logits(hidden)


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    """Greedy continuation by full recomputation each step: no cache, nothing to get wrong."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


