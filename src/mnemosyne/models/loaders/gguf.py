"""GGUF loader: llama.cpp files of the llama and qwen2 architectures, dequantised to HF-layout tensors.

llama.cpp's converter permutes the rows of llama q/k projections (for its rotary layout); we undo it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from mnemosyne.config import ModelConfig, RopeScaling
from mnemosyne.models.loaders import ModelLoadError, check_weight_shapes

ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Llama 3.1's rope scaling, stored as per-dimension factors; folded into the config instead.
_CONFIG_TENSORS = frozenset({"rope_freqs.weight"})


class GGUFLoader:
    """One .gguf file; the reader (a memory map) and the tokenizer are built once and cached."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name or str(path)

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Cross processes as the path only: a pickled memory map would copy the whole file.
        return GGUFLoader, (self.path, self.name)

    def load_config(self) -> ModelConfig:
        return self._config

    def iter_weights(
        self, device: torch.device, dtype: torch.dtype, names: Collection[str] | None = None,
        lazy: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # tensors are dequantised whole: `lazy` changes nothing
        config = self._config
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            if tensor.name in _CONFIG_TENSORS or (names is not None and name not in names):
                continue
            yield name, self._dequantize(tensor, name, config).to(device=device, dtype=dtype)

    def load_tokenizer(self) -> Any:
        return self._tokenizer

    @functools.cached_property
    def _reader(self) -> gguf.GGUFReader:
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist")
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as e:  # numpy, struct and index errors from a malformed header or data region
            raise ModelLoadError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt): {type(e).__name__}: {e}"
            ) from e
        if reader.byte_order != "I":
            raise ModelLoadError(f"{self.path}: big-endian GGUF files are not supported")
        return reader

    @functools.cached_property
    def _config(self) -> ModelConfig:
        reader = self._reader
        try:
            config = config_from_gguf(self.path, reader)
        except ModelLoadError:
            raise
        except Exception as e:  # ModelConfig's validation, or a metadata value of an unexpected type
            raise ModelLoadError(f"{self.path}: unusable metadata: {type(e).__name__}: {e}") from e
        shapes = {
            hf_name(t.name): tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
            for t in reader.tensors
            if t.name not in _CONFIG_TENSORS
        }
        check_weight_shapes(str(self.path), config, shapes)
        return config

    @functools.cached_property
    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot build a tokenizer from its metadata: {e}") from e

    def _dequantize(self, tensor: Any, name: str, config: ModelConfig) -> torch.Tensor:
        """One GGUF tensor as a float32 CPU tensor in HF layout."""
        hf_shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(hf_shape)
        except Exception as e:
            raise ModelLoadError(
                f"{self.path}: cannot dequantise tensor {tensor.name} "
                f"({tensor.tensor_type.name}, shape {list(hf_shape)}): {type(e).__name__}: {e}"
            ) from e
        if config.architecture == "llama":
            if ".q_proj." in name:
                values = unpermute_rows(values, config.num_heads)
            elif ".k_proj." in name:
                values = unpermute_rows(values, config.num_kv_heads)
        if not values.flags.writeable:  # F32 tensors come back as read-only views of the memory map
            values = np.array(values)
        return torch.from_numpy(values)


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; unknown names come back unchanged (and fail the shape check)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{tensor}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return gguf_name


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's q/k permutation, which interleaves each head's two rotary halves.

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape).
    """
    half_head_rows = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half_head_rows, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(path: Path, reader: gguf.GGUFReader) -> ModelConfig:
    """The model's architecture from GGUF metadata; raises ModelLoadError naming a missing key."""
    meta = {key: _scalar(field) for key, field in reader.fields.items() if len(field.types) == 1}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (supported: {ARCHITECTURES})")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ModelLoadError(f"{path}: metadata key {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor token_embd.weight is missing")
    hidden, num_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // num_heads)
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=_rope_scaling(path, arch, meta, tensors, theta, head_dim),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        architecture=arch,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _rope_scaling(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, Any],
                  theta: float, head_dim: int) -> RopeScaling:
    key = f"{arch}.rope.scaling."
    if "rope_freqs.weight" in tensors:
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        return _llama3_from_factors(path, np.asarray(factors, dtype=np.float64).ravel(), theta, head_dim)
    rope_type = meta.get(key + "type", "none")
    if rope_type == "none":
        return RopeScaling()
    if rope_type not in ("linear", "yarn"):
        raise ModelLoadError(f"{path}: rope scaling type {rope_type!r} is not supported")
    original = meta.get(key + "original_context_length")
    optional = {"beta_fast": meta.get(key + "yarn_beta_fast"), "beta_slow": meta.get(key + "yarn_beta_slow")}
    return RopeScaling(
        rope_type=rope_type,
        factor=_f32(meta.get(key + "factor", 1.0)),
        original_max_position_embeddings=None if original is None else int(original),
        **{k: _f32(v) for k, v in optional.items() if v is not None},
    )


def _llama3_from_factors(path: Path, factors: np.ndarray, theta: float, head_dim: int) -> RopeScaling:
    """Recover HF llama3 rope scaling from llama.cpp's rope_freqs tensor, or refuse if it is not one.

    Every Llama 3.x release uses low 1, high 4 and an 8192-token original context; the factor is the
    largest per-dimension value.
    """
    scaling = RopeScaling(rope_type="llama3", factor=float(factors.max()), original_max_position_embeddings=8192,
                          low_freq_factor=1.0, high_freq_factor=4.0)
    if factors.shape != (head_dim // 2,) or not np.allclose(llama3_factors(scaling, theta, head_dim), factors,
                                                             rtol=1e-5, atol=0.0):
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight does not match Llama 3 rope scaling; unsupported")
    return scaling


def llama3_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as convert_hf_to_gguf writes them to rope_freqs."""
    original = scaling.original_max_position_embeddings or 8192
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (original / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.array(factors)


def _scalar(field: Any) -> Any:
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value[0].item()


def _f32(value: float) -> float:
    # GGUF stores floats as float32; take the shortest decimal that round-trips (1e-05, not 9.9999997e-06).
    return float(str(np.float32(value)))
