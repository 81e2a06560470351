"""Dummy loader: real architectures with seeded random weights, generated on the target device.

For benchmarks and parallelism tests: no download, any size, and every rank sees identical tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterator
from dataclasses import replace

import torch

from mnemosyne.config import ModelConfig, RopeScaling
from mnemosyne.models.loaders import ModelLoadError, expected_weight_shapes

# eos_token_ids stay empty: a random model would emit "end" tokens at seed-dependent points, making
# benchmark output lengths random. bos ids are kept where the real model has one.
_LLAMA_3_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    bos_token_id=128000,
)
_LLAMA_3_70B = ModelConfig(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    bos_token_id=128000,
)
_LLAMA_3_1_SCALING = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
_TINY = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=4096,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": _TINY,
    "tiny-6l": replace(_TINY, num_layers=6),  # enough layers for 2- and 3-stage pipelines
    "tiny-qwen2": replace(_TINY, attention_bias=True, architecture="qwen2"),
    "llama-3-8b": _LLAMA_3_8B,
    "llama-3.1-8b": replace(_LLAMA_3_8B, rope_scaling=_LLAMA_3_1_SCALING, max_position_embeddings=131072),
    "llama-3-70b": _LLAMA_3_70B,
    "llama-3.1-70b": replace(_LLAMA_3_70B, rope_scaling=_LLAMA_3_1_SCALING, max_position_embeddings=131072),
    "llama-2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=1,
    ),
    # v0.2/v0.3 shapes: full attention (v0.1's 4096-token sliding window is not modelled).
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        architecture="mistral", bos_token_id=1,
    ),
    "qwen2-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        attention_bias=True, architecture="qwen2",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1,
    ),
}

BIAS_STD = 0.02
"""Small, so that biases perturb rather than dominate the projections."""


class DummyLoader:
    """Random weights for one preset; tensor values depend only on (seed, tensor name, device type)."""

    def __init__(self, preset: str, seed: int = 0) -> None:
        if preset not in PRESETS:
            accepted = ", ".join(f"dummy:{p}" for p in PRESETS)
            raise ModelLoadError(f"unknown dummy preset {preset!r}: expected one of {accepted}")
        self.preset = preset
        self.seed = seed
        self.name = f"dummy:{preset}"

    def load_config(self) -> ModelConfig:
        return PRESETS[self.preset]

    def iter_weights(
        self, device: torch.device, dtype: torch.dtype, names: Collection[str] | None = None,
        lazy: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # tensors are generated whole: `lazy` changes nothing
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # a generator must name the exact device
            device = torch.device("cuda", torch.cuda.current_device())
        for name, shape in expected_weight_shapes(self.load_config()).items():
            if names is None or name in names:
                yield name, random_weight(name, shape, self.seed, device, dtype)

    def load_tokenizer(self) -> None:
        return None


def tensor_seed(seed: int, name: str) -> int:
    """A stable 32-bit hash of (run seed, tensor name).

    32 bits because the CPU generator (mt19937) silently drops the high half of a 64-bit seed.
    """
    return zlib.crc32(f"{seed}/{name}".encode())


def random_weight(name: str, shape: tuple[int, ...], seed: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """One tensor, scaled so activations stay O(1) through any depth (no bf16 overflow).

    Linear weights ~ N(0, 1/in_features) keep each projection's output at the scale of its normalised
    input; the residual stream then grows only like sqrt(num_layers). Norm weights are 1.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    if name.endswith(".bias"):
        std = BIAS_STD
    elif name == "model.embed_tokens.weight":
        std = 1.0  # the first RMSNorm rescales it; unit scale keeps it comparable to the layer outputs
    else:
        std = shape[-1] ** -0.5
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, name))
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)
